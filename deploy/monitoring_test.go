package deploy_test

import (
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"

	"gopkg.in/yaml.v3"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// metric is one series name the plugin exports.
type metric struct {
	kind   string          // counter, gauge, histogram, summary
	labels map[string]bool // its labels, le included for buckets
}

// exportedMetrics parses the caddymodule package's Go files for Prometheus
// collectors (the Namespace, Subsystem and Name of every prometheus.*Opts)
// and their labels, and returns every series name they export: histograms
// as _bucket, _sum and _count.
func exportedMetrics(t *testing.T) map[string]metric {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob("../caddymodule/*.go")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]metric{}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		strConsts := map[string]string{}  // const and var idents bound to a string
		strLists := map[string][]string{} // idents bound to a []string literal
		bind := func(ident *ast.Ident, v ast.Expr) {
			if s, ok := stringLit(v); ok {
				strConsts[ident.Name] = s
			}
			if l, ok := stringList(v); ok {
				strLists[ident.Name] = l
			}
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.ValueSpec:
				for i, id := range n.Names {
					if i < len(n.Values) {
						bind(id, n.Values[i])
					}
				}
			case *ast.AssignStmt:
				for i, lhs := range n.Lhs {
					if id, ok := lhs.(*ast.Ident); ok && i < len(n.Rhs) {
						bind(id, n.Rhs[i])
					}
				}
			}
			return true
		})
		resolve := func(e ast.Expr) string {
			if s, ok := stringLit(e); ok {
				return s
			}
			if id, ok := e.(*ast.Ident); ok {
				return strConsts[id.Name]
			}
			t.Fatalf("%s: %s: a metric name part that is neither a string nor a string constant", name, fset.Position(e.Pos()))
			return ""
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			fn, ok := call.Fun.(*ast.SelectorExpr)
			if pkg, _ := fnPkg(fn); !ok || pkg != "prometheus" || !strings.HasPrefix(fn.Sel.Name, "New") || len(call.Args) == 0 {
				return true
			}
			opts, ok := call.Args[0].(*ast.CompositeLit)
			if !ok {
				return true
			}
			typ, ok := opts.Type.(*ast.SelectorExpr)
			if !ok || !strings.HasSuffix(typ.Sel.Name, "Opts") {
				return true
			}
			var parts [3]string
			for _, el := range opts.Elts {
				kv, ok := el.(*ast.KeyValueExpr)
				if !ok {
					t.Fatalf("%s: %s: unkeyed prometheus.%s", name, fset.Position(el.Pos()), typ.Sel.Name)
				}
				switch fmt.Sprint(kv.Key) {
				case "Namespace":
					parts[0] = resolve(kv.Value)
				case "Subsystem":
					parts[1] = resolve(kv.Value)
				case "Name":
					parts[2] = resolve(kv.Value)
				}
			}
			var nonEmpty []string
			for _, p := range parts {
				if p != "" {
					nonEmpty = append(nonEmpty, p)
				}
			}
			full := strings.Join(nonEmpty, "_")
			m := metric{kind: strings.ToLower(strings.TrimSuffix(typ.Sel.Name, "Opts")), labels: map[string]bool{}}
			if strings.HasSuffix(fn.Sel.Name, "Vec") && len(call.Args) > 1 {
				labels, ok := stringList(call.Args[1])
				if id, isIdent := call.Args[1].(*ast.Ident); !ok && isIdent {
					labels, ok = strLists[id.Name]
				}
				if !ok {
					t.Fatalf("%s: %s: labels of %s that are not a []string literal", name, fset.Position(call.Args[1].Pos()), full)
				}
				for _, l := range labels {
					m.labels[l] = true
				}
			}
			if _, dup := out[full]; dup {
				t.Fatalf("metric %s defined twice", full)
			}
			switch m.kind {
			case "histogram":
				bucket := metric{kind: "counter", labels: map[string]bool{"le": true}}
				for l := range m.labels {
					bucket.labels[l] = true
				}
				out[full+"_bucket"] = bucket
				out[full+"_sum"] = metric{kind: "counter", labels: m.labels}
				out[full+"_count"] = metric{kind: "counter", labels: m.labels}
			default:
				out[full] = m
			}
			return true
		})
	}
	if len(out) == 0 {
		t.Fatal("no metrics found in ../caddymodule")
	}
	return out
}

func fnPkg(fn *ast.SelectorExpr) (string, bool) {
	if fn == nil {
		return "", false
	}
	id, ok := fn.X.(*ast.Ident)
	if !ok {
		return "", false
	}
	return id.Name, true
}

func stringLit(e ast.Expr) (string, bool) {
	lit, ok := e.(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return "", false
	}
	s, err := strconv.Unquote(lit.Value)
	return s, err == nil
}

// stringList is a []string{...} literal of strings and State* constants of
// package tokensource (resolved by stateConsts).
func stringList(e ast.Expr) ([]string, bool) {
	lit, ok := e.(*ast.CompositeLit)
	if !ok {
		return nil, false
	}
	if arr, ok := lit.Type.(*ast.ArrayType); !ok || arr.Len != nil || fmt.Sprint(arr.Elt) != "string" {
		return nil, false
	}
	var out []string
	for _, el := range lit.Elts {
		if s, ok := stringLit(el); ok {
			out = append(out, s)
		} else if sel, ok := el.(*ast.SelectorExpr); ok {
			out = append(out, "tokensource."+sel.Sel.Name)
		} else {
			return nil, false
		}
	}
	return out, true
}

// labelValues are the values a label of the plugin's metrics takes: the
// replay reasons from the list in caddymodule/metrics.go, the results and
// states from tokensource's lists. A matcher for any other value never
// matches.
func labelValues(t *testing.T) map[string][]string {
	t.Helper()
	fset := token.NewFileSet()
	consts := map[string]string{}
	files, _ := filepath.Glob("../tokensource/*.go")
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			if g, ok := d.(*ast.GenDecl); ok && g.Tok == token.CONST {
				for _, spec := range g.Specs {
					vs := spec.(*ast.ValueSpec)
					for i, id := range vs.Names {
						if i < len(vs.Values) {
							if s, ok := stringLit(vs.Values[i]); ok {
								consts["tokensource."+id.Name] = s
							}
						}
					}
				}
			}
		}
	}
	f, err := parser.ParseFile(fset, "../caddymodule/metrics.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	lists := map[string][]string{}
	ast.Inspect(f, func(n ast.Node) bool {
		if vs, ok := n.(*ast.ValueSpec); ok {
			for i, id := range vs.Names {
				if i >= len(vs.Values) {
					continue
				}
				l, ok := stringList(vs.Values[i])
				if !ok {
					continue
				}
				for j, v := range l {
					if c, isConst := strings.CutPrefix(v, "tokensource."); isConst {
						if l[j], ok = consts[v]; !ok {
							t.Fatalf("metrics.go: %s: no constant tokensource.%s", id.Name, c)
						}
					}
				}
				lists[id.Name] = l
			}
		}
		return true
	})
	// Results and states are tokensource's declared lists, which metrics.go
	// takes as they are (refreshResults, accountStates).
	out := map[string][]string{"result": words(tokensource.RefreshResults()), "reason": lists["replayReasons"], "state": words(tokensource.States())}
	for l, vs := range out {
		if len(vs) == 0 {
			t.Fatalf("no values found for label %q (tokensource.RefreshResults, metrics.go's replayReasons, tokensource.States)", l)
		}
	}
	return out
}

func words[W ~string](list []W) []string {
	out := make([]string, len(list))
	for i, w := range list {
		out[i] = string(w)
	}
	return out
}

// scrapeLabels are added by Prometheus to every scraped series.
var scrapeLabels = []string{"job", "instance"}

var (
	stringRE   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	selectorRE = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}`)
	matcherRE  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"`)
	groupingRE = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	identRE    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	rateRE     = regexp.MustCompile(`\b(rate|irate|increase)\s*\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)`)
	legendRE   = regexp.MustCompile(`\{\{\s*\$?(?:labels\.)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)
)

// checkExpr checks a PromQL expression against the exported metrics: every
// caddy_* name exists, every label in a selector or grouping is one of the
// series' labels, every value matched for state, result or reason is one
// the plugin sets, and rate/increase take counters only. It returns the
// metric names used.
func checkExpr(t *testing.T, where, expr string, metrics map[string]metric, values map[string][]string) []string {
	t.Helper()
	allLabels := map[string]bool{}
	for _, m := range metrics {
		for l := range m.labels {
			allLabels[l] = true
		}
	}
	for _, l := range scrapeLabels {
		allLabels[l] = true
	}
	var used []string
	for _, sel := range selectorRE.FindAllStringSubmatch(expr, -1) {
		m, known := metrics[sel[1]]
		for _, mt := range matcherRE.FindAllStringSubmatch(sel[2], -1) {
			label, value := mt[1], mt[3]
			if known && !m.labels[label] && !slices.Contains(scrapeLabels, label) {
				t.Errorf("%s: %s has no label %q: %s", where, sel[1], label, expr)
			}
			allowed, listed := values[label]
			if !listed || strings.Contains(value, "$") {
				continue
			}
			alternatives := []string{value}
			if mt[2] == "=~" || mt[2] == "!~" {
				alternatives = strings.Split(value, "|")
			}
			for _, v := range alternatives {
				if !slices.Contains(allowed, v) {
					t.Errorf("%s: %s=%q is never set (values: %v): %s", where, label, v, allowed, expr)
				}
			}
		}
	}
	for _, g := range groupingRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(g[2], ",") {
			if l = strings.TrimSpace(l); l != "" && !allLabels[l] {
				t.Errorf("%s: %s (%s): no metric has label %q: %s", where, g[1], g[2], l, expr)
			}
		}
	}
	for _, r := range rateRE.FindAllStringSubmatch(expr, -1) {
		if m, ok := metrics[r[2]]; ok && m.kind != "counter" {
			t.Errorf("%s: %s of %s, a %s: %s", where, r[1], r[2], m.kind, expr)
		}
	}
	for _, id := range identRE.FindAllString(stringRE.ReplaceAllString(expr, `""`), -1) {
		if !strings.HasPrefix(id, "caddy_") {
			continue
		}
		if _, ok := metrics[id]; !ok {
			t.Errorf("%s: unknown metric %s (the plugin exports %v): %s", where, id, sortedKeys(metrics), expr)
		} else if !slices.Contains(used, id) {
			used = append(used, id)
		}
	}
	if len(used) == 0 {
		t.Errorf("%s: uses none of the plugin's metrics: %s", where, expr)
	}
	return used
}

// keptLabels are the labels an expression's result has: those of its
// outermost "by" when it aggregates, else those of its metrics and the
// scrape labels.
func keptLabels(expr string, metrics map[string]metric) map[string]bool {
	kept := map[string]bool{}
	if by := regexp.MustCompile(`\bby\s*\(([^)]*)\)`).FindAllStringSubmatch(expr, -1); by != nil {
		for _, l := range strings.Split(by[len(by)-1][1], ",") {
			kept[strings.TrimSpace(l)] = true
		}
		return kept
	}
	for _, id := range identRE.FindAllString(expr, -1) {
		for l := range metrics[id].labels {
			kept[l] = true
		}
	}
	for _, l := range scrapeLabels {
		kept[l] = true
	}
	return kept
}

func sortedKeys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// alertRule is one rule of alerts.yml.
type alertRule struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

func alertRules(t *testing.T) []alertRule {
	t.Helper()
	var file struct {
		Groups []struct {
			Name  string      `yaml:"name"`
			Rules []alertRule `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(readFile(t, "prometheus/alerts.yml"), &file); err != nil {
		t.Fatal(err)
	}
	var rules []alertRule
	for _, g := range file.Groups {
		rules = append(rules, g.Rules...)
	}
	if len(rules) == 0 {
		t.Fatal("prometheus/alerts.yml: no rules")
	}
	return rules
}

// runbookAnchors are the anchors GitHub makes for the headings of
// docs/operations.md, where the alerts' runbooks live.
func runbookAnchors(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	inFence := false
	for _, line := range strings.Split(string(readFile(t, "../docs/operations.md")), "\n") {
		if strings.HasPrefix(line, "```") {
			inFence = !inFence
		}
		if inFence || !strings.HasPrefix(line, "#") {
			continue
		}
		heading := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(heading) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
				b.WriteRune(r)
			}
		}
		out[b.String()] = true
	}
	return out
}

// TestAlertRules checks alerts.yml: every expression uses the plugin's
// metrics and labels as they are exported; every alert has a severity, a
// summary, a description and a runbook that points at a section of
// docs/operations.md; and alerts_test.yml shows every alert firing and, in the
// healthy run, not firing.
func TestAlertRules(t *testing.T) {
	metrics, values := exportedMetrics(t), labelValues(t)
	anchors := runbookAnchors(t)
	const runbooks = "https://github.com/restream-sidecar/caddy-restream-auth/blob/main/docs/operations.md#"
	rules := alertRules(t)
	for _, r := range rules {
		where := "alerts.yml: " + r.Alert
		if r.Alert == "" {
			t.Errorf("a rule without alert: %s", r.Expr)
			continue
		}
		checkExpr(t, where, r.Expr, metrics, values)
		if s := r.Labels["severity"]; s != "critical" && s != "warning" {
			t.Errorf("%s: severity %q: want critical or warning", where, s)
		}
		for _, a := range []string{"summary", "description", "runbook_url"} {
			if r.Annotations[a] == "" {
				t.Errorf("%s: no %s annotation", where, a)
			}
		}
		if anchor, ok := strings.CutPrefix(r.Annotations["runbook_url"], runbooks); !ok || !anchors[anchor] {
			t.Errorf("%s: runbook_url %q: want %s<a heading of docs/operations.md>", where, r.Annotations["runbook_url"], runbooks)
		}
		kept := keptLabels(r.Expr, metrics)
		for _, l := range legendRE.FindAllStringSubmatch(r.Annotations["summary"]+r.Annotations["description"], -1) {
			if l[1] != "value" && !kept[l[1]] {
				t.Errorf("%s: an annotation uses label %s, which the expression does not keep", where, l[1])
			}
		}
	}

	var tests struct {
		RuleFiles []string `yaml:"rule_files"`
		Tests     []struct {
			Name  string `yaml:"name"`
			Cases []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(readFile(t, "prometheus/alerts_test.yml"), &tests); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(tests.RuleFiles, []string{"alerts.yml"}) {
		t.Errorf("alerts_test.yml: rule_files %v: want [alerts.yml]", tests.RuleFiles)
	}
	fires, quietWhenHealthy := map[string]bool{}, map[string]bool{}
	for _, g := range tests.Tests {
		for _, c := range g.Cases {
			if len(c.ExpAlerts) > 0 {
				fires[c.Alertname] = true
			} else if strings.HasPrefix(g.Name, "healthy") {
				quietWhenHealthy[c.Alertname] = true
			}
		}
	}
	for _, r := range rules {
		if !fires[r.Alert] {
			t.Errorf("alerts_test.yml: no test shows %s firing", r.Alert)
		}
		if !quietWhenHealthy[r.Alert] {
			t.Errorf("alerts_test.yml: the healthy run does not check that %s stays quiet", r.Alert)
		}
	}
}

// dashboardExprs are the PromQL expressions of a Grafana dashboard: every
// panel target's and every query variable's.
func dashboardExprs(t *testing.T, dash map[string]any) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(panels []any)
	walk = func(panels []any) {
		for _, p := range panels {
			title := str(p, "title")
			if typ := str(p, "type"); typ != "row" {
				if uid := str(p, "datasource", "uid"); uid != "${DS_PROMETHEUS}" {
					t.Errorf("panel %q: datasource %q: want ${DS_PROMETHEUS}", title, uid)
				}
				if len(list(p, "targets")) == 0 {
					t.Errorf("panel %q: no targets", title)
				}
			}
			for _, tg := range list(p, "targets") {
				if uid := str(tg, "datasource", "uid"); uid != "${DS_PROMETHEUS}" {
					t.Errorf("panel %q target %s: datasource %q: want ${DS_PROMETHEUS}", title, str(tg, "refId"), uid)
				}
				out[fmt.Sprintf("panel %q target %s", title, str(tg, "refId"))] = str(tg, "expr")
			}
			walk(list(p, "panels"))
		}
	}
	walk(list(dash, "panels"))
	for _, v := range list(dash, "templating", "list") {
		if str(v, "type") == "query" {
			if uid := str(v, "datasource", "uid"); uid != "${DS_PROMETHEUS}" {
				t.Errorf("variable %q: datasource %q: want ${DS_PROMETHEUS}", str(v, "name"), uid)
			}
			out[fmt.Sprintf("variable %q", str(v, "name"))] = str(v, "query", "query")
		}
	}
	return out
}

// grafanaVarRE matches Grafana's variables in an expression.
var grafanaVarRE = regexp.MustCompile(`\$\{?([a-zA-Z_][a-zA-Z0-9_]*)\}?`)

// promQL turns a Grafana expression into plain PromQL for promtool.
func promQL(expr string) string {
	return grafanaVarRE.ReplaceAllStringFunc(expr, func(v string) string {
		switch strings.Trim(v, "${}") {
		case "__rate_interval", "__interval", "__range":
			return "5m"
		default:
			return ".*"
		}
	})
}

// TestDashboard checks the Grafana dashboard: valid JSON, the datasource
// variable ${DS_PROMETHEUS} and an account variable, the panels the
// operator needs, and every expression against the exported metrics.
func TestDashboard(t *testing.T) {
	var dash map[string]any
	if err := json.Unmarshal(readFile(t, "grafana/restream-auth.json"), &dash); err != nil {
		t.Fatalf("grafana/restream-auth.json: %v", err)
	}
	if v, _ := get(dash, "schemaVersion").(float64); v < 36 {
		t.Errorf("schemaVersion %v: want 36 or later", get(dash, "schemaVersion"))
	}
	vars := map[string]any{}
	for _, v := range list(dash, "templating", "list") {
		vars[str(v, "name")] = v
	}
	if str(vars["DS_PROMETHEUS"], "type") != "datasource" || str(vars["DS_PROMETHEUS"], "query") != "prometheus" {
		t.Error("no datasource variable DS_PROMETHEUS of type prometheus")
	}
	if v := vars["account"]; str(v, "type") != "query" || get(v, "includeAll") != true {
		t.Error("no query variable account with All")
	}
	var inputs bool
	for _, in := range list(dash, "__inputs") {
		inputs = inputs || (str(in, "name") == "DS_PROMETHEUS" && str(in, "pluginId") == "prometheus")
	}
	if !inputs {
		t.Error("__inputs has no DS_PROMETHEUS, which Grafana's import asks for")
	}

	metrics, values := exportedMetrics(t), labelValues(t)
	used := map[string]bool{}
	exprs := dashboardExprs(t, dash)
	for where, expr := range exprs {
		for _, m := range checkExpr(t, where, expr, metrics, values) {
			used[m] = true
		}
		if strings.HasPrefix(where, "panel") && !strings.Contains(expr, `account=~"$account"`) {
			t.Errorf("%s: does not filter by the account variable: %s", where, expr)
		}
	}
	// The panels the brief asks for, by what they must show.
	for _, want := range []struct{ what, re string }{
		{"state per account", `caddy_restream_auth_state\b`},
		{"access token time left", `caddy_restream_auth_access_token_expiry_timestamp_seconds.*- time\(\)`},
		{"refresh token days left", `caddy_restream_auth_refresh_token_expiry_timestamp_seconds.*- time\(\)\) / 86400`},
		{"refresh outcomes rate", `rate\(caddy_restream_auth_refreshes_total`},
		{"refresh duration p50", `histogram_quantile\(0\.5, .*caddy_restream_auth_refresh_duration_seconds_bucket`},
		{"refresh duration p99", `histogram_quantile\(0\.99, .*caddy_restream_auth_refresh_duration_seconds_bucket`},
		{"lock wait", `caddy_restream_auth_lock_wait_seconds_bucket`},
		{"replays", `caddy_restream_auth_replays_total`},
		{"unavailable (503) rate", `rate\(caddy_restream_auth_unavailable_total`},
		{"persist failures", `caddy_restream_auth_persist_failures_total`},
	} {
		re := regexp.MustCompile(want.re)
		var found bool
		for _, expr := range exprs {
			found = found || re.MatchString(expr)
		}
		if !found {
			t.Errorf("no panel shows %s (an expression matching %s)", want.what, want.re)
		}
	}
	for _, l := range list(dash, "panels") {
		for _, tg := range list(l, "targets") {
			kept := keptLabels(str(tg, "expr"), metrics)
			for _, m := range legendRE.FindAllStringSubmatch(str(tg, "legendFormat"), -1) {
				if !kept[m[1]] {
					t.Errorf("panel %q: legend uses label %s, which the expression does not keep", str(l, "title"), m[1])
				}
			}
		}
	}
}

// promtool returns the promtool binary, or skips the test (fails it when
// RESTREAM_REQUIRE_PROMTOOL=1, as CI sets).
func promtool(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("promtool")
	if err == nil {
		return bin
	}
	msg := "promtool is not installed (Debian: apt-get install prometheus; then stop the daemon it may start)"
	if os.Getenv("RESTREAM_REQUIRE_PROMTOOL") == "1" {
		t.Fatalf("%s, and RESTREAM_REQUIRE_PROMTOOL=1 requires it", msg)
	}
	t.Skip(msg + "; skipping")
	return ""
}

func runPromtool(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command(promtool(t), args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestPromtool runs promtool on the alerts and their unit tests, and checks
// the dashboard's expressions parse (as recording rules).
func TestPromtool(t *testing.T) {
	if testing.Short() {
		t.Skip("runs promtool on the alert rules, their tests and the dashboard's expressions")
	}
	runPromtool(t, "prometheus", "check", "rules", "alerts.yml")
	runPromtool(t, "prometheus", "test", "rules", "alerts_test.yml")

	var dash map[string]any
	if err := json.Unmarshal(readFile(t, "grafana/restream-auth.json"), &dash); err != nil {
		t.Fatal(err)
	}
	type record struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	var rules []record
	exprs := dashboardExprs(t, dash)
	for _, where := range sortedKeys(exprs) {
		expr := exprs[where]
		if strings.HasPrefix(where, "variable") {
			continue // label_values() is Grafana's, not PromQL
		}
		rules = append(rules, record{Record: fmt.Sprintf("dashboard:expr_%d", len(rules)), Expr: promQL(expr)})
	}
	b, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "dashboard.yml"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	runPromtool(t, dir, "check", "rules", "dashboard.yml")
}
