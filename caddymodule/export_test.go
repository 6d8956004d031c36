package caddymodule

// SourcesInPool reports how many token sources the reload-shared pool holds.
func SourcesInPool() int {
	n := 0
	sources.Range(func(_, _ any) bool { n++; return true })
	return n
}

// WalkJSON is walkJSON, for the external tests.
var WalkJSON = walkJSON
