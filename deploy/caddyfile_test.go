package deploy_test

import (
	"encoding/json"
	"io/fs"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	// The restream_auth modules, directives and global option.
	_ "github.com/restream-sidecar/caddy-restream-auth"
)

// endpoint is where a probe or healthcheck expects a route.
type endpoint struct {
	host string // 127.0.0.1, or a placeholder for the pod IP
	port int
	path string
}

// deployCaddyfile is one Caddyfile of the deployment and where its health
// route is probed from.
type deployCaddyfile struct {
	name   string
	body   string
	health endpoint
	live   *endpoint // a liveness route, if the deployment probes one
}

// deployCaddyfiles finds every Caddyfile in deploy/: files named Caddyfile
// (probed by docker-compose.yml's healthcheck) and the Caddyfile keys of
// the Kubernetes ConfigMaps (probed by the Deployment's readiness probe).
func deployCaddyfiles(t *testing.T) []deployCaddyfile {
	t.Helper()
	var out []deployCaddyfile

	var composeHealth endpoint
	for _, svc := range get(yamlDocs(t, "docker-compose.yml")[0], "services").(map[string]any) {
		for _, arg := range strs(get(svc, "healthcheck", "test")) {
			if u, err := url.Parse(arg); err == nil && u.Scheme == "http" {
				port, _ := strconv.Atoi(u.Port())
				composeHealth = endpoint{u.Hostname(), port, u.Path}
			}
		}
	}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (d.Name() == "Caddyfile" || strings.HasSuffix(d.Name(), ".caddyfile")) {
			out = append(out, deployCaddyfile{name: path, body: string(readFile(t, path)), health: composeHealth})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	objs := k8sObjects(t)
	for key, o := range objs {
		if !strings.HasPrefix(key, "ConfigMap/") {
			continue
		}
		for k, v := range get(o, "data").(map[string]any) {
			if k != "Caddyfile" && !strings.HasSuffix(k, ".caddyfile") {
				continue
			}
			// The pod that mounts it probes it.
			cf := deployCaddyfile{name: key + " " + k, body: v.(string)}
			for pk, p := range objs {
				if !strings.HasPrefix(pk, "Deployment/") {
					continue
				}
				pod := get(p, "spec", "template", "spec")
				_, sidecars := podContainers(pod)
				for _, c := range sidecars {
					ports := map[string]int{}
					for _, cp := range list(c, "ports") {
						ports[str(cp, "name")], _ = get(cp, "containerPort").(int)
					}
					probe := func(kind string) *endpoint {
						port, ok := get(c, kind, "httpGet", "port").(int)
						if !ok {
							port = ports[str(c, kind, "httpGet", "port")]
						}
						return &endpoint{"{env.POD_IP}", port, str(c, kind, "httpGet", "path")}
					}
					cf.health = *probe("readinessProbe")
					cf.live = probe("livenessProbe")
				}
			}
			out = append(out, cf)
		}
	}
	if len(out) < 2 {
		t.Fatalf("found %d Caddyfiles, want deploy/Caddyfile and the Kubernetes ConfigMap's", len(out))
	}
	return out
}

// routeHandlers lists the handlers of Caddy JSON routes (subroutes
// included) with the path each is reached on.
func routeHandlers(routes []any, path string, visit func(handler map[string]any, path string)) {
	for _, r := range routes {
		p := path
		for _, m := range list(r, "match") {
			if paths := strs(get(m, "path")); len(paths) == 1 {
				p = paths[0]
			}
		}
		for _, h := range list(r, "handle") {
			hm, _ := h.(map[string]any)
			visit(hm, p)
			if str(hm, "handler") == "subroute" {
				routeHandlers(list(hm, "routes"), p, visit)
			}
		}
	}
}

// TestCaddyfilesAdapt adapts every Caddyfile of the deployment with Caddy's
// own adapter (this plugin's directives and global option registered) and
// checks the JSON: the admin API on a unix socket; every listener on
// loopback or the pod IP, the one that adds credentials on loopback only;
// the health route where the healthcheck or readiness probe looks for it;
// metrics off the API listener; and the Redis storage configured.
func TestCaddyfilesAdapt(t *testing.T) {
	for _, cf := range deployCaddyfiles(t) {
		t.Run(cf.name, func(t *testing.T) {
			for _, v := range envRefs(cf.body) {
				t.Setenv(v, "CHANGE_ME")
			}
			t.Setenv("POD_IP", "10.0.0.7")
			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf.body), map[string]any{"filename": cf.name})
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("adapt warning: %s", w)
			}
			var cfg map[string]any
			if err := json.Unmarshal(out, &cfg); err != nil {
				t.Fatal(err)
			}
			if l := str(cfg, "admin", "listen"); !strings.HasPrefix(l, "unix//run/caddy/") {
				t.Errorf("admin listen %q: want a unix socket in /run/caddy (the application shares the loopback)", l)
			}
			for _, secret := range []string{"RESTREAM_CLIENT_SECRET", "RESTREAM_REFRESH_TOKEN", "RESTREAM_ENCRYPTION_KEY", "REDIS_PASSWORD"} {
				if strings.Contains(cf.body, secret) && !strings.Contains(cf.body, "{env."+secret+"}") {
					t.Errorf("%s is read other than with {env.%s}: it would end up in the JSON config", secret, secret)
				}
			}
			if strings.Contains(string(out), "CHANGE_ME") {
				t.Error("an environment value was substituted into the JSON config ({$VAR}): use {env.VAR}")
			}

			// Each server is either the API (restream_auth and the proxy, on
			// 127.0.0.1:8080) or the probes-and-metrics listener (nothing
			// that adds credentials or proxies).
			apiHandlers := []string{"subroute", "rewrite", "restream_auth", "reverse_proxy"}
			opsHandlers := []string{"subroute", "restream_auth_health", "metrics", "static_response", "static_response 200"}
			servers, _ := get(cfg, "apps", "http", "servers").(map[string]any)
			found := map[string][]endpoint{} // handler -> where it is served
			for name, srv := range servers {
				var addrs []caddy.NetworkAddress
				for _, l := range strs(get(srv, "listen")) {
					a, err := caddy.ParseNetworkAddress(l)
					if err != nil {
						t.Fatalf("server %s: listen %q: %v", name, l, err)
					}
					if a.Host != "127.0.0.1" && a.Host != "{env.POD_IP}" {
						t.Errorf("server %s listens on %q: want 127.0.0.1 (or the pod IP for probes)", name, l)
					}
					addrs = append(addrs, a)
				}
				if len(addrs) == 0 {
					t.Errorf("server %s has no listen address", name)
				}
				handlers := map[string]bool{}
				routeHandlers(list(srv, "routes"), "", func(h map[string]any, path string) {
					handler := str(h, "handler")
					if code := get(h, "status_code"); handler == "static_response" && (code == nil || code == 200.0 || code == "200") {
						handler = "static_response 200"
					}
					handlers[handler] = true
					for _, a := range addrs {
						found[handler] = append(found[handler], endpoint{a.Host, int(a.StartPort), path})
					}
				})
				allowed := opsHandlers
				if handlers["restream_auth"] {
					allowed = apiHandlers
					for _, a := range addrs {
						if a.Host != "127.0.0.1" || a.StartPort != 8080 {
							t.Errorf("server %s: restream_auth (it adds credentials) on %s: want 127.0.0.1:8080 only", name, a)
						}
					}
				}
				for h := range handlers {
					if !slices.Contains(allowed, h) {
						t.Errorf("server %s: handler %s does not belong next to %v", name, h, sortedKeys(handlers))
					}
				}
			}
			if !slices.Contains(found["restream_auth_health"], cf.health) {
				t.Errorf("restream_auth_health served at %+v; the healthcheck or readiness probe asks %+v", found["restream_auth_health"], cf.health)
			}
			if cf.live != nil && !slices.Contains(found["static_response 200"], *cf.live) {
				t.Errorf("the liveness probe asks %+v; a plain 200 is served at %+v", *cf.live, found["static_response 200"])
			}
			if len(found["restream_auth"]) == 0 || len(found["metrics"]) == 0 {
				t.Errorf("want restream_auth and metrics served, got %v", found)
			}

			// The global option: Redis storage for every account.
			app := get(cfg, "apps", "restream_auth")
			if app == nil {
				t.Fatal("no restream_auth app: the redis global option did not apply")
			}
			raw, _ := json.Marshal(app)
			if !strings.Contains(string(raw), "{env.REDIS_PASSWORD}") {
				t.Errorf("apps.restream_auth %s: want the Redis URL with {env.REDIS_PASSWORD}", raw)
			}
		})
	}
}
