// Package deploy_test checks the deployment files in this directory: the
// Docker Compose and Kubernetes manifests, the sidecars' Caddyfiles (adapted
// with Caddy's own adapter), the Prometheus alerts (with promtool) and the
// Grafana dashboard (every expression against the metrics the plugin
// registers).
package deploy_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// imageName is the name of the image built from xcaddy.Dockerfile, the same
// in every file here.
const imageName = "caddy-restream-auth"

// closeTimeout is how long a token source may take to stop (Close waits up
// to the refresh timeout, 10 s by default, plus 1 s), storing a pair it was
// refreshing.
const closeTimeout = 11 * time.Second

// readFile reads a file relative to deploy/.
func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.FromSlash(name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// yamlDocs decodes every document of a YAML file.
func yamlDocs(t *testing.T, name string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, name)))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
}

// get walks maps by key; nil when a key is missing.
func get(v any, path ...string) any {
	for _, k := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}

func str(v any, path ...string) string {
	s, _ := get(v, path...).(string)
	return s
}

func list(v any, path ...string) []any {
	l, _ := get(v, path...).([]any)
	return l
}

// strs is a YAML string or list of strings.
func strs(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

// isSidecarImage reports whether ref names the image built from
// xcaddy.Dockerfile, in any registry and with any tag.
func isSidecarImage(ref string) bool {
	repo, _, _ := strings.Cut(ref, "@")
	if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
		repo = repo[:i]
	}
	return repo == imageName || strings.HasSuffix(repo, "/"+imageName)
}

// envRefs are the environment variables a Caddyfile reads: {env.X} at run
// time, {$X} when it is read.
var envRefRE = regexp.MustCompile(`\{(?:env\.|\$)([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}`)

func envRefs(caddyfile string) []string {
	var out []string
	for _, m := range envRefRE.FindAllStringSubmatch(caddyfile, -1) {
		if !slices.Contains(out, m[1]) {
			out = append(out, m[1])
		}
	}
	slices.Sort(out)
	return out
}

// placeholderValue is what example credentials look like: never a real one.
func placeholderValue(v string) bool {
	return v == "" || v == "CHANGE_ME"
}

// parseEnvFile reads KEY=value lines, skipping comments.
func parseEnvFile(t *testing.T, name string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for i, line := range strings.Split(string(readFile(t, name)), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Errorf("%s:%d: not KEY=value: %q", name, i+1, line)
			continue
		}
		out[k] = v
	}
	return out
}

// caddyShutdown is how long Caddy may take to stop with caddyfile: its
// grace_period for requests in flight, then the token sources' Close.
func caddyShutdown(t *testing.T, name, caddyfile string) time.Duration {
	t.Helper()
	m := regexp.MustCompile(`(?m)^\s*grace_period\s+(\S+)`).FindStringSubmatch(caddyfile)
	if m == nil {
		t.Errorf("%s: no grace_period: Caddy would wait for requests in flight without bound", name)
		return closeTimeout
	}
	d, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatalf("%s: grace_period %q: %v", name, m[1], err)
	}
	if regexp.MustCompile(`(?m)^\s*timeout\s`).MatchString(caddyfile) {
		t.Fatalf("%s sets a timeout: update closeTimeout in this test to timeout + 1 s", name)
	}
	return d + closeTimeout
}

// TestCompose checks docker-compose.yml: two application replicas, each with
// its own sidecar built from xcaddy.Dockerfile in its network namespace; no
// published port anywhere; credentials from env files whose examples hold
// placeholders only; Redis with an append-only file on a named volume.
func TestCompose(t *testing.T) {
	docs := yamlDocs(t, "docker-compose.yml")
	if len(docs) != 1 {
		t.Fatalf("docker-compose.yml: %d documents, want 1", len(docs))
	}
	compose := docs[0]
	services, _ := get(compose, "services").(map[string]any)
	if len(services) == 0 {
		t.Fatal("docker-compose.yml: no services")
	}
	caddyfile := string(readFile(t, "Caddyfile"))

	for name, svc := range services {
		for _, key := range []string{"ports", "expose"} {
			if get(svc, key) != nil {
				t.Errorf("service %s: %s %v: nothing here may be reachable from outside its replica or network", name, key, get(svc, key))
			}
		}
		if str(svc, "network_mode") == "host" {
			t.Errorf("service %s: network_mode host: its loopback would be the host's", name)
		}
	}

	apps := map[string]string{} // app service -> its sidecar
	for name, svc := range services {
		if !isSidecarImage(str(svc, "image")) && str(svc, "build", "dockerfile") != "xcaddy.Dockerfile" {
			continue
		}
		t.Run(name, func(t *testing.T) {
			if img := str(svc, "image"); !isSidecarImage(img) {
				t.Errorf("image %q: want %s (the name xcaddy.Dockerfile documents)", img, imageName)
			}
			if df := str(svc, "build", "dockerfile"); df != "xcaddy.Dockerfile" {
				t.Errorf("build.dockerfile %q: want xcaddy.Dockerfile", df)
			}
			ctx := str(svc, "build", "context")
			if _, err := os.Stat(filepath.Join(ctx, "xcaddy.Dockerfile")); err != nil {
				t.Errorf("build.context %q has no xcaddy.Dockerfile: %v", ctx, err)
			}
			app, ok := strings.CutPrefix(str(svc, "network_mode"), "service:")
			if !ok || get(services, app) == nil {
				t.Errorf("network_mode %q: want service:<application>, so the sidecar listens on the replica's loopback", str(svc, "network_mode"))
			} else if other, dup := apps[app]; dup {
				t.Errorf("shares %s with %s: each replica needs its own sidecar", app, other)
			} else {
				apps[app] = name
			}
			if !slices.Contains(strs(get(svc, "volumes")), "./Caddyfile:/etc/caddy/Caddyfile:ro") {
				t.Errorf("volumes %v: want ./Caddyfile mounted read-only at /etc/caddy/Caddyfile", get(svc, "volumes"))
			}
			files := strs(get(svc, "env_file"))
			if !slices.Contains(files, "restream.env") {
				t.Errorf("env_file %v: want restream.env (the client credentials)", files)
			}
			defined := map[string]bool{}
			for _, f := range files {
				for k, v := range parseEnvFile(t, f+".example") {
					defined[k] = true
					if !placeholderValue(v) {
						t.Errorf("%s.example: %s=%q: examples hold placeholders (CHANGE_ME) only", f, k, v)
					}
				}
			}
			for _, v := range envRefs(caddyfile) {
				if !defined[v] {
					t.Errorf("the Caddyfile reads %s, which none of the env files %v defines", v, files)
				}
			}
			if env := get(svc, "environment"); env != nil {
				t.Errorf("environment %v: credentials come from the env files only", env)
			}
			if get(svc, "read_only") != true {
				t.Error("read_only is not true")
			}
			if !slices.Contains(strs(get(svc, "cap_drop")), "ALL") {
				t.Error("cap_drop does not drop ALL")
			}
			if u := str(svc, "user"); u == "" || u == "0" || strings.HasPrefix(u, "0:") || u == "root" {
				t.Errorf("user %q: run as a non-root user", u)
			}
			grace, err := time.ParseDuration(str(svc, "stop_grace_period"))
			if need := caddyShutdown(t, "Caddyfile", caddyfile); err != nil || grace < need {
				t.Errorf("stop_grace_period %q: want at least %v (grace_period, then Close storing a refresh in flight)", str(svc, "stop_grace_period"), need)
			}
			test := strs(get(svc, "healthcheck", "test"))
			if !slices.Contains(test, "http://127.0.0.1:9180/healthz") {
				t.Errorf("healthcheck %v: want the health route, http://127.0.0.1:9180/healthz", test)
			}
		})
	}
	if len(apps) < 2 {
		t.Fatalf("%d application replicas with a sidecar, want 2", len(apps))
	}
	for app := range apps {
		if img := str(services[app], "image"); isSidecarImage(img) {
			t.Errorf("service %s: the application is not the sidecar image", app)
		}
	}

	t.Run("redis", func(t *testing.T) {
		redis := get(services, "redis")
		if redis == nil {
			t.Fatal("no redis service (the Caddyfile's redis URL names host redis)")
		}
		cmd := strings.Join(strs(get(redis, "command")), " ")
		checkRedisCommand(t, cmd)
		if !strings.Contains(cmd, `--requirepass "$$REDIS_PASSWORD"`) {
			t.Errorf("command %q: want the password from the environment at run time ($$REDIS_PASSWORD)", cmd)
		}
		if !slices.Contains(strs(get(redis, "env_file")), "redis.env") {
			t.Errorf("env_file %v: want redis.env", get(redis, "env_file"))
		}
		if _, ok := parseEnvFile(t, "redis.env.example")["REDIS_PASSWORD"]; !ok {
			t.Error("redis.env.example does not define REDIS_PASSWORD")
		}
		var dataVolume string
		for _, v := range strs(get(redis, "volumes")) {
			if src, dst, _ := strings.Cut(v, ":"); dst == "/data" {
				dataVolume = src
			}
		}
		if dataVolume == "" || strings.ContainsAny(dataVolume, "./") {
			t.Errorf("volumes %v: want a named volume at /data", get(redis, "volumes"))
		} else if _, ok := get(compose, "volumes").(map[string]any)[dataVolume]; !ok {
			t.Errorf("volume %s is not declared under volumes", dataVolume)
		}
		for _, n := range strs(get(redis, "networks")) {
			if get(compose, "networks", n, "internal") != true {
				t.Errorf("network %s: want internal: true (Redis has no route outside the host)", n)
			}
		}
		if !strings.Contains(caddyfile, "@redis:6379/") {
			t.Error("the Caddyfile's redis URL does not name the redis service (redis:6379)")
		}
		checkMinReplicas(t, caddyfile, cmd, 1)
	})

	ignore := string(readFile(t, ".gitignore"))
	for _, f := range []string{"restream.env", "redis.env"} {
		if !strings.Contains(ignore, "/"+f+"\n") {
			t.Errorf(".gitignore does not ignore %s (real credentials)", f)
		}
	}
}

// k8sObjects reads every manifest kustomization.yaml lists, by kind and name.
func k8sObjects(t *testing.T) map[string]map[string]any {
	t.Helper()
	kust := yamlDocs(t, "kubernetes/kustomization.yaml")[0]
	objs := map[string]map[string]any{}
	listed := map[string]bool{"kustomization.yaml": true}
	for _, r := range strs(get(kust, "resources")) {
		listed[r] = true
		for _, doc := range yamlDocs(t, "kubernetes/"+r) {
			key := str(doc, "kind") + "/" + str(doc, "metadata", "name")
			if _, dup := objs[key]; dup {
				t.Errorf("%s defined twice", key)
			}
			objs[key] = doc
		}
	}
	files, _ := filepath.Glob("kubernetes/*.yaml")
	for _, f := range files {
		if !listed[filepath.Base(f)] {
			t.Errorf("%s is not in kustomization.yaml's resources", f)
		}
	}
	for _, img := range list(kust, "images") {
		if str(img, "name") != imageName {
			t.Errorf("kustomization.yaml: image %q: want %s", str(img, "name"), imageName)
		}
	}
	return objs
}

// podContainers are a pod's containers and native sidecars (init containers
// that keep running).
func podContainers(pod any) (app, sidecars []any) {
	for _, c := range list(pod, "containers") {
		if isSidecarImage(str(c, "image")) {
			sidecars = append(sidecars, c)
		} else {
			app = append(app, c)
		}
	}
	for _, c := range list(pod, "initContainers") {
		if isSidecarImage(str(c, "image")) && str(c, "restartPolicy") == "Always" {
			sidecars = append(sidecars, c)
		}
	}
	return app, sidecars
}

// TestKubernetes checks the manifests: a Deployment whose pods run the
// application and the sidecar; the sidecar's Caddyfile from the ConfigMap;
// credentials from Secrets with placeholder values; probes on the routes the
// Caddyfile serves; non-root, read-only root filesystem, resources; a grace
// period long enough to store a refresh in flight; Redis with an
// append-only file on a PersistentVolume behind the Service the Caddyfile
// names.
func TestKubernetes(t *testing.T) {
	objs := k8sObjects(t)
	var deployments []map[string]any
	for key, o := range objs {
		if strings.HasPrefix(key, "Deployment/") {
			deployments = append(deployments, o)
		}
	}
	if len(deployments) != 1 {
		t.Fatalf("%d Deployments, want 1", len(deployments))
	}
	dep := deployments[0]
	if n, _ := get(dep, "spec", "replicas").(int); n < 2 {
		t.Errorf("replicas %v: want at least 2", get(dep, "spec", "replicas"))
	}
	pod := get(dep, "spec", "template", "spec")
	apps, sidecars := podContainers(pod)
	if len(apps) != 1 || len(sidecars) != 1 {
		t.Fatalf("the pod has %d application containers and %d sidecars (image %s), want 1 and 1", len(apps), len(sidecars), imageName)
	}
	sidecar := sidecars[0]
	if get(pod, "hostNetwork") == true {
		t.Error("hostNetwork: the sidecar's loopback would be the node's")
	}

	// The Caddyfile the sidecar runs.
	var caddyfile string
	var configMap string
	for _, m := range list(sidecar, "volumeMounts") {
		if str(m, "mountPath") != "/etc/caddy" {
			continue
		}
		for _, v := range list(pod, "volumes") {
			if str(v, "name") == str(m, "name") {
				configMap = str(v, "configMap", "name")
			}
		}
	}
	if cm := objs["ConfigMap/"+configMap]; cm == nil {
		t.Fatalf("the sidecar mounts no ConfigMap of these manifests at /etc/caddy (found %q)", configMap)
	} else {
		caddyfile = str(cm, "data", "Caddyfile")
	}
	if caddyfile == "" {
		t.Fatalf("ConfigMap %s has no Caddyfile", configMap)
	}

	// Every variable the Caddyfile reads comes from the sidecar's env, and
	// every secret from a Secret key that exists, with a placeholder value.
	env := map[string]any{}
	for _, e := range list(sidecar, "env") {
		env[str(e, "name")] = e
		if v := get(e, "value"); v != nil {
			t.Errorf("env %s: a literal value; take it from a Secret or the downward API", str(e, "name"))
		}
		if ref := get(e, "valueFrom", "secretKeyRef"); ref != nil {
			secret := objs["Secret/"+str(ref, "name")]
			val, ok := get(secret, "stringData", str(ref, "key")).(string)
			if !ok {
				t.Errorf("env %s: Secret %s has no key %s", str(e, "name"), str(ref, "name"), str(ref, "key"))
			} else if !placeholderValue(val) {
				t.Errorf("Secret %s: %s=%q: the example holds placeholders (CHANGE_ME) only", str(ref, "name"), str(ref, "key"), val)
			}
		}
	}
	if get(sidecar, "envFrom") != nil {
		t.Error("envFrom: list each variable, so this test can match them with the Caddyfile")
	}
	for _, v := range envRefs(caddyfile) {
		if env[v] == nil {
			t.Errorf("the Caddyfile reads %s, which the sidecar's env does not set", v)
		}
	}
	if str(env["POD_IP"], "valueFrom", "fieldRef", "fieldPath") != "status.podIP" {
		t.Error("env POD_IP: want the downward API's status.podIP")
	}

	// Only the probes-and-metrics port is a port of the pod; never on a host.
	for _, c := range append(append([]any{}, apps...), sidecar) {
		for _, p := range list(c, "ports") {
			if get(p, "hostPort") != nil {
				t.Errorf("container %s: hostPort %v", str(c, "name"), get(p, "hostPort"))
			}
			if get(p, "containerPort") == 8080 {
				t.Errorf("container %s: port 8080 (the API, which adds credentials) is for the pod's loopback only", str(c, "name"))
			}
		}
	}
	probePort := map[string]int{}
	for _, p := range list(sidecar, "ports") {
		n, _ := get(p, "containerPort").(int)
		probePort[str(p, "name")] = n
	}
	probe := func(kind string) (string, int) {
		path := str(sidecar, kind, "httpGet", "path")
		port := get(sidecar, kind, "httpGet", "port")
		if s, ok := port.(string); ok {
			port = probePort[s]
		}
		n, _ := port.(int)
		return path, n
	}
	if path, port := probe("readinessProbe"); path != "/healthz" || port != 9180 {
		t.Errorf("readinessProbe GET :%d%s: want :9180/healthz (restream_auth_health)", port, path)
	}
	if path, port := probe("livenessProbe"); path != "/livez" || port != 9180 {
		t.Errorf("livenessProbe GET :%d%s: want :9180/livez (Caddy up; a restart cannot mend the chain)", port, path)
	}
	if path, port := probe("startupProbe"); path != "/livez" || port != 9180 {
		t.Errorf("startupProbe GET :%d%s: want :9180/livez", port, path)
	}

	// Hardening and resources, for every container of the pod.
	if get(pod, "securityContext", "runAsNonRoot") != true {
		t.Error("pod securityContext: runAsNonRoot is not true")
	}
	if get(pod, "automountServiceAccountToken") != false {
		t.Error("automountServiceAccountToken is not false")
	}
	for _, c := range append(append([]any{}, apps...), sidecar) {
		name := str(c, "name")
		if get(c, "securityContext", "readOnlyRootFilesystem") != true {
			t.Errorf("container %s: readOnlyRootFilesystem is not true", name)
		}
		if get(c, "securityContext", "allowPrivilegeEscalation") != false {
			t.Errorf("container %s: allowPrivilegeEscalation is not false", name)
		}
		if !slices.Contains(strs(get(c, "securityContext", "capabilities", "drop")), "ALL") {
			t.Errorf("container %s: capabilities do not drop ALL", name)
		}
		for _, r := range []string{"requests", "limits"} {
			for _, k := range []string{"cpu", "memory"} {
				if get(c, "resources", r, k) == nil {
					t.Errorf("container %s: no resources.%s.%s", name, r, k)
				}
			}
		}
	}
	writable := map[string]bool{}
	for _, m := range list(sidecar, "volumeMounts") {
		for _, v := range list(pod, "volumes") {
			if str(v, "name") == str(m, "name") && get(v, "emptyDir") != nil {
				writable[str(m, "mountPath")] = true
			}
		}
	}
	for _, dir := range []string{"/data", "/config", "/run/caddy"} {
		if !writable[dir] {
			t.Errorf("sidecar: %s is not a writable emptyDir (the root filesystem is read-only)", dir)
		}
	}
	for _, c := range apps {
		for _, m := range list(c, "volumeMounts") {
			if str(m, "mountPath") == "/run/caddy" {
				t.Errorf("container %s mounts the sidecar's admin socket", str(c, "name"))
			}
		}
	}
	if strings.Contains(caddyfile, "admin unix//run/caddy/") == false {
		t.Error("the Caddyfile's admin API is not on a socket in /run/caddy: the application shares the pod's loopback")
	}

	grace, _ := get(pod, "terminationGracePeriodSeconds").(int)
	if need := caddyShutdown(t, "ConfigMap "+configMap, caddyfile); time.Duration(grace)*time.Second < need+10*time.Second {
		t.Errorf("terminationGracePeriodSeconds %d: want at least %v (grace_period and Close storing a refresh in flight) plus time for the application", grace, need+10*time.Second)
	}

	t.Run("redis", func(t *testing.T) {
		m := regexp.MustCompile(`redis\s+redis://[^@\s]*@([^:/\s]+):(\d+)/`).FindStringSubmatch(caddyfile)
		if m == nil {
			t.Fatal("the Caddyfile has no redis URL with a host and port")
		}
		svc := objs["Service/"+m[1]]
		if svc == nil {
			t.Fatalf("the redis URL names host %s, which is no Service here", m[1])
		}
		var port bool
		for _, p := range list(svc, "spec", "ports") {
			port = port || get(p, "port") == atoi(t, m[2])
		}
		if !port {
			t.Errorf("Service %s does not serve port %s", m[1], m[2])
		}
		var sts map[string]any
		for key, o := range objs {
			if strings.HasPrefix(key, "StatefulSet/") && str(o, "spec", "template", "metadata", "labels", "app.kubernetes.io/name") == str(svc, "spec", "selector", "app.kubernetes.io/name") {
				sts = o
			}
		}
		if sts == nil {
			t.Fatalf("no StatefulSet behind Service %s", m[1])
		}
		containers := list(sts, "spec", "template", "spec", "containers")
		if len(containers) != 1 {
			t.Fatalf("StatefulSet: %d containers, want 1", len(containers))
		}
		redis := containers[0]
		cmd := strings.Join(strs(get(redis, "command")), " ")
		checkRedisCommand(t, cmd)
		if !strings.Contains(cmd, `--requirepass "$REDIS_PASSWORD"`) {
			t.Errorf("command %q: want the password from the environment at run time", cmd)
		}
		n, _ := get(sts, "spec", "replicas").(int)
		checkMinReplicas(t, caddyfile, cmd, n)
		var claims []string
		for _, c := range list(sts, "spec", "volumeClaimTemplates") {
			claims = append(claims, str(c, "metadata", "name"))
		}
		var persisted bool
		for _, vm := range list(redis, "volumeMounts") {
			persisted = persisted || (str(vm, "mountPath") == "/data" && slices.Contains(claims, str(vm, "name")))
		}
		if !persisted {
			t.Error("Redis's /data is not a volumeClaimTemplate: the append-only file would not survive the pod")
		}
		if get(redis, "securityContext", "readOnlyRootFilesystem") != true || get(sts, "spec", "template", "spec", "securityContext", "runAsNonRoot") != true {
			t.Error("Redis: want runAsNonRoot and readOnlyRootFilesystem")
		}
	})
}

// checkRedisCommand checks that Redis keeps what it acknowledged: the
// append-only file, synced on every write (a few writes an hour per
// account), and no eviction of keys under memory pressure.
func checkRedisCommand(t *testing.T, cmd string) {
	t.Helper()
	for _, opt := range []string{"--appendonly yes", "--appendfsync always", "--maxmemory-policy noeviction"} {
		if !strings.Contains(cmd, opt) {
			t.Errorf("redis command %q: want %s, so Redis never loses the newest refresh token it acknowledged", cmd, opt)
		}
	}
}

// checkMinReplicas checks that the Caddyfile's min_replicas can be met by
// the Redis servers deployed: with one server and no replication, every
// write that waits for a replica would fail and no pair would be stored.
func checkMinReplicas(t *testing.T, caddyfile, redisCommand string, servers int) {
	t.Helper()
	min := 0
	if m := regexp.MustCompile(`(?m)^\s*min_replicas\s+(\d+)`).FindStringSubmatch(caddyfile); m != nil {
		min = atoi(t, m[1])
	}
	replicas := 0
	if strings.Contains(redisCommand, "--replicaof") {
		replicas = servers - 1
	}
	if min > replicas {
		t.Errorf("min_replicas %d, but the deployment runs %d Redis replicas: no write could be acknowledged", min, replicas)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			t.Fatalf("not a number: %q", s)
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// TestImageName checks that every file names the sidecar image as
// xcaddy.Dockerfile's own instructions do.
func TestImageName(t *testing.T) {
	dockerfile := string(readFile(t, "../xcaddy.Dockerfile"))
	if !strings.Contains(dockerfile, "-t "+imageName+" ") {
		t.Errorf("xcaddy.Dockerfile does not build -t %s: update imageName and the files here", imageName)
	}
	var refs []string
	for _, svc := range get(yamlDocs(t, "docker-compose.yml")[0], "services").(map[string]any) {
		if str(svc, "build", "dockerfile") == "xcaddy.Dockerfile" {
			refs = append(refs, str(svc, "image"))
		}
	}
	for _, o := range k8sObjects(t) {
		_, sidecars := podContainers(get(o, "spec", "template", "spec"))
		for _, c := range sidecars {
			refs = append(refs, str(c, "image"))
		}
	}
	if len(refs) < 3 {
		t.Fatalf("found %d sidecar images, want 2 in compose and 1 in Kubernetes: %v", len(refs), refs)
	}
	for _, r := range refs {
		if !isSidecarImage(r) {
			t.Errorf("image %q is not %s", r, imageName)
		}
	}
}

// TestKustomizeBuild renders kubernetes/ with kubectl's kustomize, when
// kubectl is installed: the manifests build, and the sidecar's image is
// mapped to the registry kustomization.yaml names.
func TestKustomizeBuild(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Skip("kubectl is not installed (Debian: apt-get install kubernetes-client); skipping")
	}
	out, err := exec.Command(kubectl, "kustomize", "kubernetes").Output()
	if err != nil {
		t.Fatalf("kubectl kustomize kubernetes: %v", err)
	}
	kust := yamlDocs(t, "kubernetes/kustomization.yaml")[0]
	want := str(list(kust, "images")[0], "newName") + ":" + str(list(kust, "images")[0], "newTag")
	dec := yaml.NewDecoder(bytes.NewReader(out))
	var images []string
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		_, sidecars := podContainers(get(doc, "spec", "template", "spec"))
		for _, c := range sidecars {
			images = append(images, str(c, "image"))
		}
	}
	if len(images) != 1 || images[0] != want {
		t.Errorf("rendered sidecar images %v: want [%s]", images, want)
	}
}
