package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// machine describes where the benchmark ran.
type machine struct {
	CPUs   int
	Model  string
	Kernel string
	Go     string
	Caddy  string
}

func describeMachine() machine {
	m := machine{CPUs: runtime.NumCPU(), Model: "unknown CPU", Go: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH, Caddy: "?"}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.Model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = "Linux " + strings.TrimSpace(string(b))
	} else {
		m.Kernel = runtime.GOOS
	}
	return m
}

var clockTicks = sync.OnceValue(func() int64 {
	// USER_HZ, the unit of /proc/<pid>/stat times; 100 on every common Linux.
	if out, err := exec.Command("getconf", "CLK_TCK").Output(); err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return 100
})

// readCPU returns the user+system CPU time process pid has used, from
// /proc/<pid>/stat (all its threads together).
func readCPU(pid int) (time.Duration, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// The command name (field 2) may hold spaces: count from its ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, false
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(utime+stime) * time.Second / time.Duration(clockTicks()), true
}

// readPeakRSS returns process pid's peak resident set size (VmHWM) in bytes,
// or 0 if unknown.
func readPeakRSS(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return n << 10
				}
			}
		}
	}
	return 0
}

// readSystemCPU returns the busy CPU time of the whole machine (all CPUs,
// from /proc/stat), without idle and iowait, and without interrupt time:
// the kernel does much of the loopback traffic's work there, on behalf of
// Caddy and this program but charged to neither.
func readSystemCPU() (time.Duration, bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, false
	}
	var busy int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 || i == 5 || i == 6 || i >= 8 { // idle, iowait, irq, softirq; guest times are already in user
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, false
		}
		busy += n
	}
	return time.Duration(busy) * time.Second / time.Duration(clockTicks()), true
}

// sampleBusy returns how many CPUs the machine keeps busy over d.
func sampleBusy(ctx context.Context, d time.Duration) (float64, bool) {
	b0, ok0 := readSystemCPU()
	t0 := time.Now()
	select {
	case <-ctx.Done():
		return 0, false
	case <-time.After(d):
	}
	b1, ok1 := readSystemCPU()
	return float64(b1-b0) / float64(time.Since(t0)), ok0 && ok1
}
