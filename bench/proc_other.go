//go:build !linux

package main

import "os/exec"

// dieWithParent is Linux-only; elsewhere the deferred cleanup kills children.
func dieWithParent(*exec.Cmd) {}
