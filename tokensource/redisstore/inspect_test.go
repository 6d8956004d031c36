package redisstore_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// Inspect shows record, lease (holder, TTL and what Redis leaves of it) and
// mark as they are, and changes nothing: no import from Caddy storage, no
// write-back, no lease.
func TestInspectReadsWithoutWriting(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	fs, _ := caddyStorage(t, pair("c", 5))
	s := newStore(t, srv, redisstore.Options{ImportFrom: fs})

	snap, err := s.Inspect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if snap.Record != nil || snap.RecordErr != nil || snap.Data != nil || snap.Lease != nil || snap.Mark != "" {
		t.Fatalf("empty Redis: %+v", snap)
	}
	if n := srv.MustDo("DBSIZE"); n != int64(0) {
		t.Fatalf("Inspect wrote %v keys (an import?)", n)
	}

	rec := pair("c", 7)
	mustStore(t, s, rec, tokensource.Version{})
	l, err := s.TakeLease(ctxT(t), "instance-a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	l.Mark, l.MarkedBy = tokensource.Fingerprint(rec.RefreshToken), "instance-a"
	if err := s.RenewLease(ctxT(t), l); err != nil {
		t.Fatal(err)
	}
	snap, err = s.Inspect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if snap.Record == nil || snap.Record.Generation != 7 || snap.Record.Chain != "c" || snap.RecordErr != nil || len(snap.Data) == 0 {
		t.Fatalf("record: %+v %v", snap.Record, snap.RecordErr)
	}
	if lv := snap.Lease; lv == nil || lv.Owner != "instance-a" || lv.TTL != time.Minute || lv.Left <= 50*time.Second || lv.Left > time.Minute {
		t.Fatalf("lease: %+v", snap.Lease)
	}
	if snap.Mark != l.Mark || snap.MarkedBy != "instance-a" {
		t.Fatalf("mark %q by %q", snap.Mark, snap.MarkedBy)
	}

	// Released, the mark stays and the lease is gone.
	if err := s.ReleaseLease(ctxT(t), l); err != nil {
		t.Fatal(err)
	}
	if snap, err = s.Inspect(ctxT(t)); err != nil || snap.Lease != nil || snap.Mark != l.Mark {
		t.Fatalf("after release: %+v %v", snap, err)
	}

	// A lease key this store did not write, without expiry, and a corrupt record.
	srv.MustDo("SET", leaseKey(), "not json")
	srv.MustDo("DEL", recordKey())
	srv.MustDo("SET", recordKey(), "garbage")
	snap, err = s.Inspect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(snap.RecordErr, tokensource.ErrCorruptRecord) || snap.Record != nil || snap.Data != nil {
		t.Fatalf("corrupt record: %+v", snap)
	}
	if lv := snap.Lease; lv == nil || lv.Owner == "" || lv.Left >= 0 {
		t.Fatalf("foreign lease key: %+v", snap.Lease)
	}
	if v := srv.MustDo("PTTL", leaseKey()); v != int64(-1) {
		t.Fatalf("Inspect gave the lease key an expiry (PTTL %v)", v)
	}
}

// Inspect's errors, like every other, never show the password.
func TestInspectErrorHidesPassword(t *testing.T) {
	const right, wrong = "inspect-right-pw-41", "inspect-wrong-pw-42"
	srv := redistest.Start(t, redistest.Options{Password: right})
	s := newStoreURL(t, "redis://:"+wrong+"@"+srv.Addr()+"/0", redisstore.Options{})
	_, err := s.Inspect(ctxT(t))
	if err == nil {
		t.Fatal("Inspect with a wrong password succeeded")
	}
	for _, pw := range []string{right, wrong} {
		if strings.Contains(err.Error(), pw) {
			t.Fatalf("the error shows a password: %v", err)
		}
	}
	t.Logf("error: %v", err)
}
