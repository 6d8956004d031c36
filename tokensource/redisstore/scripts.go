package redisstore

import "github.com/redis/go-redis/v9"

// The store's atomic steps, each one Lua script. A script runs alone on the
// server, so its reads and writes see no other client in between; every
// expiry is Redis's own (PX), never a client's clock.
//
// Keys: the record is a hash (gen, chain, data) so a script can compare
// versions without decoding data, which may be encrypted; the lease is a
// string, the holder's token, with a PX expiry; the mark is a hash (mark,
// marked_by) without expiry, so it outlives every lease.

// takeLease: KEYS lease, mark; ARGV token, ttl_ms, owner.
// Returns {1, mark, marked_by} when taken, {0} while another owner holds it.
// The owner's own live lease is taken over (as by the storage store). A
// lease key without expiry (not written by this store) is given one TTL, so
// it counts as a live lease of an unknown owner that nobody renews.
var takeLeaseScript = redis.NewScript(`
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not ok then
	local cur = redis.call('GET', KEYS[1])
	local same = false
	if cur then
		local decoded, l = pcall(cjson.decode, cur)
		same = decoded and type(l) == 'table' and l.owner == ARGV[3]
	end
	if not same then
		if redis.call('PTTL', KEYS[1]) == -1 then
			redis.call('PEXPIRE', KEYS[1], ARGV[2])
		end
		return {0}
	end
	redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if redis.call('TYPE', KEYS[2]).ok ~= 'hash' then
	return {1, '', ''}
end
local m = redis.call('HMGET', KEYS[2], 'mark', 'marked_by')
return {1, m[1] or '', m[2] or ''}
`)

// writeMark is shared by renewLease and releaseLease; an empty mark clears
// the mark key.
const writeMark = `
local function writeMark(key, mark, by)
	redis.call('DEL', key)
	if mark ~= '' then
		redis.call('HSET', key, 'mark', mark, 'marked_by', by)
	end
end
`

// renewLease: KEYS lease, mark; ARGV token, ttl_ms, mark, marked_by.
// Owner-only: returns 1 if renewed (and the mark written), 0 if the token
// no longer holds the lease.
var renewLeaseScript = redis.NewScript(writeMark + `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
	return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
writeMark(KEYS[2], ARGV[3], ARGV[4])
return 1
`)

// releaseLease: KEYS lease, mark; ARGV token, mark, marked_by.
// Owner-only: returns 1 if released, the mark kept as given; 0 if the token
// no longer held the lease (it lapsed: the mark stays as last written).
var releaseLeaseScript = redis.NewScript(writeMark + `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
	return 0
end
redis.call('DEL', KEYS[1])
writeMark(KEYS[2], ARGV[2], ARGV[3])
return 1
`)

// readRecord is shared by load and compareAndStore: the record's type and
// fields, or a reason it is corrupt.
const readRecord = `
local function readRecord(key)
	local t = redis.call('TYPE', key).ok
	if t == 'none' then
		return nil
	end
	if t ~= 'hash' then
		return nil, 'is a Redis ' .. t .. ', not a hash'
	end
	local f = redis.call('HMGET', key, 'gen', 'chain', 'data')
	if not f[1] or not f[2] or not f[3] or not tonumber(f[1]) then
		return nil, 'lacks its gen, chain or data field'
	end
	return {gen = f[1], chain = f[2], data = f[3]}
end

-- newer: a record of the same chain as cur with a higher generation, or
-- any chain's record over a history-only one (no chain, generation 0: the
-- dead seed an instance sent into a Redis that had lost the chain). Only a
-- Redis that lost writes (restarted without persistence, failed over to a
-- replica that lagged) holds an older generation of a chain than a client,
-- or history where a client holds a live chain; the live pair wins.
local function newer(gen, chain, cur)
	if chain == '' then
		return false
	end
	if cur.chain == '' and tonumber(cur.gen) == 0 then
		return true
	end
	return cur.chain == chain and tonumber(cur.gen) < tonumber(gen)
end
`

// compareAndStore: KEYS record, lease; ARGV base_gen, base_chain, gen,
// chain, data, then the caller's lease tokens (none for a write outside a
// lease). Returns {status, stored_gen, stored_chain, detail}:
//
//	ok          written: the stored version was base
//	restored    written: the record was gone, or held an older generation of
//	            base's chain (Redis lost data; the caller's pair is newer)
//	same        an earlier attempt already wrote exactly data
//	conflict    the stored version is not base; nothing written
//	lease_lost  none of the tokens holds the lease; nothing written
//	corrupt     the key holds something unusable; never overwritten
//
// same comes before the fence: the record is already there (written by an
// earlier attempt, or written back from memory by the watch after Redis lost
// it), and nothing is written.
//
// The fence: a caller that holds a lease writes only while the lease is
// still its own, except when lease and record are both gone, which no
// expiry produces (records never expire): then Redis lost its data, and the
// caller holds the newest pair there is; and while the settle lease of a
// record written back from memory holds (see load): Redis lost the caller's
// lease then, nobody refreshes, and the caller's pair, compared on the
// version like any write, is the newer record the settle waits for.
var compareAndStoreScript = redis.NewScript(readRecord + `
local function settling(holder)
	if not holder then
		return false
	end
	local decoded, l = pcall(cjson.decode, holder)
	return decoded and type(l) == 'table' and l.owner == '` + settleOwner + `' and l.nonce == ''
end
local cur, bad = readRecord(KEYS[1])
if bad then
	return {'corrupt', '', '', bad}
end
if cur and cur.data == ARGV[5] then
	return {'same', cur.gen, cur.chain, ''}
end
if #ARGV > 5 then
	local holder = redis.call('GET', KEYS[2])
	local held = false
	for i = 6, #ARGV do
		if holder == ARGV[i] then
			held = true
		end
	end
	if not held and not (not holder and not cur) and not settling(holder) then
		return {'lease_lost', '', '', ''}
	end
end
local status = 'ok'
if not cur then
	if ARGV[1] ~= '0' or ARGV[2] ~= '' then
		status = 'restored'
	end
elseif cur.gen ~= ARGV[1] or cur.chain ~= ARGV[2] then
	if not newer(ARGV[1], ARGV[2], cur) then
		return {'conflict', cur.gen, cur.chain, ''}
	end
	status = 'restored'
end
redis.call('HSET', KEYS[1], 'gen', ARGV[3], 'chain', ARGV[4], 'data', ARGV[5])
if cur then
	return {status, cur.gen, cur.chain, ''}
end
return {status, '', '', ''}
`)

// load: KEYS record, lease, mark; ARGV settle_token, settle_ms, then the record
// this client last read or wrote (gen, chain, data), or nothing. Returns
// {status, gen, chain, data, detail}:
//
//	ok        data is the stored record
//	restored  the record was gone, or held an older generation of the known
//	          record's chain: the known one was written back and is returned
//	none      there is no record (and none known)
//	corrupt   the key holds something unusable
//
// A record written back from a client's memory may be older than one
// another client holds (it read the record just before a rotation it has
// not seen yet). So a write-back also takes the lease for settle_ms under a
// token no client owns: nobody refreshes from the written-back record until
// every client had the time to write back a newer one (their stores check
// every WatchInterval). It takes the lease even from a client, unless a
// token is marked: a lease on a Redis that lost the record was taken after
// the loss, on what its taker knew before it (a lease request sent before a
// crash lands on the restarted server), and its holder must not refresh
// from the record just written back either. Without a mark the holder has
// sent nothing (it marks before it sends), so its next renewal, the one
// that would mark, finds the lease lost; a holder that marked may be
// sending, and keeps its lease for the time it counts on (I3). A holder
// that lost its lease may still store a pair it already has (see the
// settle exception of compareAndStore).
var loadScript = redis.NewScript(readRecord + `
local cur, bad = readRecord(KEYS[1])
if bad then
	return {'corrupt', '', '', '', bad}
end
if #ARGV == 5 and (not cur or newer(ARGV[3], ARGV[4], cur)) then
	redis.call('HSET', KEYS[1], 'gen', ARGV[3], 'chain', ARGV[4], 'data', ARGV[5])
	if redis.call('EXISTS', KEYS[3]) == 0 then
		redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
	else
		redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
	end
	local was = 'gone'
	if cur then
		was = cur.gen
	end
	return {'restored', ARGV[3], ARGV[4], ARGV[5], was}
end
if not cur then
	return {'none', '', '', '', ''}
end
return {'ok', cur.gen, cur.chain, cur.data, ''}
`)
