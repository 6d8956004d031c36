package main

import (
	"os/exec"
	"syscall"
)

// dieWithParent has the kernel kill the child if this program dies without
// cleaning up (SIGKILL, a crash).
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
