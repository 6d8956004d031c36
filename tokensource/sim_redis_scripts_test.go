package tokensource

// The simulated Redis's scripts (sim_redis_test.go): a Go transcription of
// each of redisstore's Lua scripts (redisstore/scripts.go), and what the
// shared checks read from the model (lease, record, version).

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"
)

// takeLease: KEYS lease, mark; ARGV token, ttl_ms, owner.
func (rd *simRedis) takeLease(_ *simInstance, keys, argv []string) (any, error) {
	cur, ok, err := rd.getString(keys[0])
	if err != nil {
		return nil, err
	}
	if ok {
		var l map[string]any
		same := json.Unmarshal([]byte(cur), &l) == nil && l["owner"] == argv[2]
		if !same {
			if k := rd.get(keys[0]); k.expire.IsZero() {
				d, _ := strconv.ParseInt(argv[1], 10, 64)
				k.expire = rd.w.now.Add(time.Duration(d) * time.Millisecond)
			}
			return []any{int64(0)}, nil
		}
	}
	rd.setPX(keys[0], argv[0], argv[1])
	m := rd.get(keys[1])
	if m == nil || m.hash == nil {
		return []any{int64(1), "", ""}, nil
	}
	return []any{int64(1), m.hash["mark"], m.hash["marked_by"]}, nil
}

// renewLease: KEYS lease, mark; ARGV token, ttl_ms, mark, marked_by.
func (rd *simRedis) renewLease(_ *simInstance, keys, argv []string) (any, error) {
	cur, ok, err := rd.getString(keys[0])
	if err != nil {
		return nil, err
	}
	if !ok || cur != argv[0] {
		return int64(0), nil
	}
	rd.setPX(keys[0], argv[0], argv[1])
	rd.writeMark(keys[1], argv[2], argv[3])
	return int64(1), nil
}

// releaseLease: KEYS lease, mark; ARGV token, mark, marked_by.
func (rd *simRedis) releaseLease(_ *simInstance, keys, argv []string) (any, error) {
	cur, ok, err := rd.getString(keys[0])
	if err != nil {
		return nil, err
	}
	if !ok || cur != argv[0] {
		return int64(0), nil
	}
	delete(rd.data, keys[0])
	rd.writeMark(keys[1], argv[1], argv[2])
	return int64(1), nil
}

// readRecord is the scripts' readRecord.
func (rd *simRedis) readRecord(key string) (*simRedisRecordFields, string) {
	k := rd.get(key)
	if k == nil {
		return nil, ""
	}
	if k.hash == nil {
		return nil, "is a Redis string, not a hash"
	}
	gen, ok1 := k.hash["gen"]
	chain, ok2 := k.hash["chain"]
	data, ok3 := k.hash["data"]
	if _, err := strconv.ParseFloat(gen, 64); !ok1 || !ok2 || !ok3 || err != nil {
		return nil, "lacks its gen, chain or data field"
	}
	return &simRedisRecordFields{gen, chain, data}, ""
}

func simNum(s string) float64 { f, _ := strconv.ParseFloat(s, 64); return f }

// newer is the scripts' newer.
func simNewer(gen, chain string, cur *simRedisRecordFields) bool {
	if chain == "" {
		return false
	}
	if cur.chain == "" && simNum(cur.gen) == 0 {
		return true
	}
	return cur.chain == chain && simNum(cur.gen) < simNum(gen)
}

// compareAndStore: KEYS record, lease; ARGV base_gen, base_chain, gen,
// chain, data, then the caller's lease tokens.
func (rd *simRedis) compareAndStore(inst *simInstance, keys, argv []string) (any, error) {
	cur, bad := rd.readRecord(keys[0])
	if bad != "" {
		return []any{"corrupt", "", "", bad}, nil
	}
	if cur != nil && cur.data == argv[4] {
		return []any{"same", cur.gen, cur.chain, ""}, nil
	}
	if len(argv) > 5 {
		holder, ok, err := rd.getString(keys[1])
		if err != nil {
			return nil, err
		}
		held := false
		for _, tok := range argv[5:] {
			if ok && holder == tok {
				held = true
			}
		}
		if !held && !(!ok && cur == nil) && !simSettling(holder) {
			return []any{"lease_lost", "", "", ""}, nil
		}
	}
	status := "ok"
	if cur == nil {
		if argv[0] != "0" || argv[1] != "" {
			status = "restored"
		}
	} else if cur.gen != argv[0] || cur.chain != argv[1] {
		if !simNewer(argv[0], argv[1], cur) {
			return []any{"conflict", cur.gen, cur.chain, ""}, nil
		}
		status = "restored"
	}
	rd.landRecord(inst, keys, argv[2], argv[3], argv[4], cur, "compareAndStore "+status)
	if cur != nil {
		return []any{status, cur.gen, cur.chain, ""}, nil
	}
	return []any{status, "", "", ""}, nil
}

// load: KEYS record, lease, mark; ARGV settle_token, settle_ms, then the record
// the client last read or wrote (gen, chain, data), or nothing.
func (rd *simRedis) load(inst *simInstance, keys, argv []string) (any, error) {
	cur, bad := rd.readRecord(keys[0])
	if bad != "" {
		return []any{"corrupt", "", "", "", bad}, nil
	}
	if len(argv) == 5 && (cur == nil || simNewer(argv[2], argv[3], cur)) {
		rd.landRecord(inst, keys, argv[2], argv[3], argv[4], cur, "load restored")
		if rd.get(keys[2]) == nil || rd.get(keys[1]) == nil { // SET PX without a mark, else SET NX PX
			rd.setPX(keys[1], argv[0], argv[1])
		}
		was := "gone"
		if cur != nil {
			was = cur.gen
		}
		return []any{"restored", argv[2], argv[3], argv[4], was}, nil
	}
	if cur == nil {
		return []any{"none", "", "", "", ""}, nil
	}
	return []any{"ok", cur.gen, cur.chain, cur.data, ""}, nil
}

// landRecord writes the record and checks the fence and the write-back rule
// against what the model knows, not against what the script compared.
func (rd *simRedis) landRecord(inst *simInstance, keys []string, gen, chain, data string, cur *simRedisRecordFields, how string) {
	w := rd.w
	if strings.HasSuffix(how, "restored") {
		rd.writeBacks++
		rd.writtenBack[data] = true
		if cur != nil && !simNewer(gen, chain, cur) {
			w.violate("write-back: %s (%s) wrote generation %s of chain %q over generation %s of chain %q",
				inst.name, how, gen, chain, cur.gen, cur.chain)
		}
	}
	if strings.HasPrefix(how, "compareAndStore") && len(rd.held[inst]) > 0 {
		holder, ok, _ := rd.getString(keys[1])
		if !rd.held[inst][holder] && !(!ok && cur == nil) && !simSettling(holder) {
			w.violate("fence: %s (%s) wrote generation %s while its lease is gone (the lease is %q's)", inst.name, how, gen, simLeaseOwner(holder))
		}
	}
	if chain == "" && rd.gap != nil && rd.gap.chain != "" {
		// A history-only record (a dead seed sent into the emptied Redis)
		// does not restore the lost chain, and no longer blocks its
		// write-back: the gap stays open.
		rd.historyOverGap++
	}
	rd.data[keys[0]] = &simRedisKey{hash: map[string]string{"gen": gen, "chain": chain, "data": data}}
	w.model.stored(keys[0], []byte(data), inst)
	if chain == "" {
		return
	}
	if g := rd.gap; g != nil {
		if n, _ := strconv.ParseUint(gen, 10, 64); chain != g.chain || n >= g.gen {
			rd.gap, rd.gapClosed = nil, w.now
		}
	}
	if u := rd.unrestored; u != nil {
		if g, _ := strconv.ParseUint(gen, 10, 64); chain != u.chain || g >= u.gen {
			rd.unrestored = nil
		}
	}
}

// simSettling is the scripts' settling: the lease is the settle lease of a
// record written back from memory.
func simSettling(holder string) bool {
	var l map[string]any
	return json.Unmarshal([]byte(holder), &l) == nil && l["owner"] == simSettleOwner && l["nonce"] == ""
}

func simLeaseOwner(token string) string {
	var l struct{ Owner string }
	if json.Unmarshal([]byte(token), &l) != nil {
		return ""
	}
	return l.Owner
}

// leaseOwner is the owner of the unexpired lease key at true time.
func (rd *simRedis) leaseOwner() string {
	tok, _, _ := rd.getString(simRedisLease)
	return simLeaseOwner(tok)
}

// lease is the lease and mark as the shared checks read them.
func (rd *simRedis) lease() *leaseRecord {
	l := &leaseRecord{Owner: rd.leaseOwner()}
	if m := rd.get(simRedisMark); m != nil && m.hash != nil {
		l.Mark, l.MarkedBy = m.hash["mark"], m.hash["marked_by"]
	}
	if l.Owner == "" && l.Mark == "" {
		return nil
	}
	return l
}

// record is the stored record's data and the key it is sealed to.
func (rd *simRedis) record() (data []byte, key string, ok bool) {
	f, _ := rd.readRecord(simRedisRecord)
	if f == nil {
		return nil, "", false
	}
	return []byte(f.data), simRedisRecord, true
}

func (rd *simRedis) version() *simVersion {
	f, _ := rd.readRecord(simRedisRecord)
	if f == nil {
		return nil
	}
	g, _ := strconv.ParseUint(f.gen, 10, 64)
	return &simVersion{g, f.chain}
}
