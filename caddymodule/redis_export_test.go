package caddymodule

import "github.com/redis/go-redis/v9"

// RedisClientsInPool lists the Redis clients the reload-shared pool holds.
func RedisClientsInPool() []*redis.Client {
	var out []*redis.Client
	redisClients.Range(func(_, v any) bool {
		out = append(out, v.(pooledClient).Client)
		return true
	})
	return out
}
