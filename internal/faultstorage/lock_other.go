//go:build !unix

package faultstorage

import (
	"errors"
	"fmt"
	"os"
	"time"
)

// lockFile takes path as an O_EXCL lock file, waiting up to 10s for it. A
// process killed while holding it leaves it behind (unlike flock on unix).
func lockFile(path string) (unlock func(), err error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err == nil {
			f.Close()
			return func() { _ = os.Remove(path) }, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return nil, err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lock file %s held for over 10s", path)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
