package redisstore_test

import (
	"errors"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// caddyStorage is a Caddy file_system storage holding rec as the account's
// record, as an instance on Caddy storage left it.
func caddyStorage(t *testing.T, rec *tokensource.Record) (*certmagic.FileStorage, tokensource.Store) {
	t.Helper()
	fs := &certmagic.FileStorage{Path: t.TempDir()}
	ss := tokensource.NewStorageStore(fs, account, nil, nil, nil)
	if rec != nil {
		if err := ss.CompareAndStore(ctxT(t), rec, tokensource.Version{}); err != nil {
			t.Fatal(err)
		}
	}
	return fs, ss
}

func TestImportFromCaddyStorageOnce(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rec := pair("c", 5)
	rec.ConsumedSeeds = []string{tokensource.Fingerprint("seed")}
	rec.DeadTokens = []string{tokensource.Fingerprint("rt-c-3")}
	fs, ss := caddyStorage(t, rec)

	s := newStore(t, srv, redisstore.Options{ImportFrom: fs})
	got := mustLoad(t, s)
	if got == nil || got.Generation != 5 || got.Chain != "c" || got.RefreshToken != rec.RefreshToken ||
		got.AccessToken != rec.AccessToken || len(got.ConsumedSeeds) != 1 || len(got.DeadTokens) != 1 {
		t.Fatalf("imported %+v, want %+v", got, rec)
	}
	// Nothing lost: another instance reads the same from Redis alone.
	if again := mustLoad(t, newStore(t, srv, redisstore.Options{})); again.RefreshToken != rec.RefreshToken {
		t.Fatalf("Redis holds %+v", again)
	}
	// The storage copy is marked: an instance still on Caddy storage never
	// sends the token now carried on in Redis.
	l, err := ss.TakeLease(ctxT(t), "old-instance", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if l.Mark != tokensource.Fingerprint(rec.RefreshToken) || l.MarkedBy != redisstore.ImportedBy {
		t.Fatalf("storage lease mark %q by %q, want the imported token by %q", l.Mark, l.MarkedBy, redisstore.ImportedBy)
	}
	if err := ss.ReleaseLease(ctxT(t), l); err != nil {
		t.Fatal(err)
	}
	// The storage record itself is untouched.
	if st, _ := ss.Load(ctxT(t)); st.Generation != 5 || st.RefreshToken != rec.RefreshToken {
		t.Fatalf("storage record changed: %+v", st)
	}

	// Redis loses everything and every instance restarts: the storage copy
	// is stale by now, so it is not imported again.
	srv.MustDo("FLUSHALL")
	if got := mustLoad(t, newStore(t, srv, redisstore.Options{ImportFrom: fs})); got != nil {
		t.Fatalf("a stale storage copy was imported again: %+v", got)
	}
}

func TestImportWaitsForCaddyStorageLease(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rec := pair("c", 2)
	fs, ss := caddyStorage(t, rec)
	// An instance still on Caddy storage is refreshing: it holds the lease,
	// with a mark on a token it may have sent.
	l, err := ss.TakeLease(ctxT(t), "old-instance", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	l.Mark, l.MarkedBy = "fp-in-doubt", "old-instance"
	if err := ss.RenewLease(ctxT(t), l); err != nil {
		t.Fatal(err)
	}
	s := newStore(t, srv, redisstore.Options{ImportFrom: fs})
	got, err := s.Load(ctxT(t))
	if err == nil || got != nil || errors.Is(err, tokensource.ErrCorruptRecord) {
		t.Fatalf("Load while the storage lease is held: %+v, %v; want a transient error", got, err)
	}
	if srv.MustDo("EXISTS", recordKey()) != int64(0) {
		t.Fatal("imported while an instance on Caddy storage held the lease")
	}
	if err := ss.ReleaseLease(ctxT(t), l); err != nil {
		t.Fatal(err)
	}
	if got := mustLoad(t, s); got == nil || got.Generation != 2 {
		t.Fatalf("Load after the release: %+v, want the imported generation 2", got)
	}
	// The mark came along: the token stays in doubt under Redis.
	rl, err := newStore(t, srv, redisstore.Options{}).TakeLease(ctxT(t), "new", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if rl.Mark != "fp-in-doubt" || rl.MarkedBy != "old-instance" {
		t.Fatalf("Redis lease mark %q by %q, want the storage lease's", rl.Mark, rl.MarkedBy)
	}
}

func TestNoImportOverRedisRecord(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	fs, _ := caddyStorage(t, pair("old", 9))
	mustStore(t, newStore(t, srv, redisstore.Options{}), pair("c", 1), tokensource.Version{})
	if got := mustLoad(t, newStore(t, srv, redisstore.Options{ImportFrom: fs})); got.Chain != "c" {
		t.Fatalf("Load imported over Redis's record: %+v", got)
	}
	// Nothing in either place: nothing to import, no error.
	empty, _ := caddyStorage(t, nil)
	srv.MustDo("FLUSHALL")
	if got := mustLoad(t, newStore(t, srv, redisstore.Options{ImportFrom: empty})); got != nil {
		t.Fatalf("Load with nothing anywhere: %+v", got)
	}
}

// An install takes the lease before it reads the record. On a Redis that
// has not imported the account yet, the import must not then fail against
// the lease its own store holds: it runs before the lease is taken.
func TestImportBeforeLeaseTakenFirst(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	rec := pair("c", 4)
	fs, _ := caddyStorage(t, rec)
	s := newStore(t, srv, redisstore.Options{ImportFrom: fs})
	l, err := s.TakeLease(ctxT(t), "instance/install", time.Minute)
	if err != nil {
		t.Fatalf("TakeLease on a Redis still to import: %v", err)
	}
	got, err := s.Load(ctxT(t))
	if err != nil || got == nil || got.Generation != 4 || got.Chain != "c" {
		t.Fatalf("Load under the install's lease: %+v, %v (want the imported c/4)", got, err)
	}
	next := pair("n", 5)
	if err := s.CompareAndStore(ctxT(t), next, tokensource.Version{Generation: 4, Chain: "c"}); err != nil {
		t.Fatalf("installing over the imported record: %v", err)
	}
	if err := s.ReleaseLease(ctxT(t), l); err != nil {
		t.Fatal(err)
	}
}
