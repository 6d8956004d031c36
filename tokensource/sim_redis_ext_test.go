package tokensource_test

import (
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// The simulation (package tokensource) runs the real redisstore, which
// imports tokensource: only this external test package can build one.
func init() {
	tokensource.SimNewRedisStore = func(opt *redis.Options, hook redis.Hook, account string, minReplicas int,
		kr *tokensource.Keyring, clock tokensource.Clock, log *zap.Logger) (tokensource.Store, error) {
		c := redisstore.NewClient(opt)
		c.AddHook(hook)
		// The simulation runs the watch itself, in simulated time.
		return redisstore.New(c, account, redisstore.Options{MinReplicas: minReplicas, Keyring: kr, Clock: clock, Logger: log, WatchInterval: -1})
	}
}
