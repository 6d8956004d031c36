package tokensource

import (
	"fmt"
	"testing"
	"time"
)

// TestSimulationRegressions aims the simulation at each defect the protocol was
// rebuilt to remove: every item runs simItemSchedules schedules shaped to
// provoke it (300; 60 under the race detector, 30 with -short), asserts
// I1–I8 and chain survival as TestSimulation does, and asserts that the
// situation really arose (a test that never meets its defect proves
// nothing). Each of these failed with its defect put back.
func TestSimulationRegressions(t *testing.T) {
	t.Parallel()
	schedules := simItemSchedules
	if testing.Short() {
		schedules = min(schedules, simShortItemSchedules)
	}
	for _, it := range simItems {
		t.Run(it.name, func(t *testing.T) {
			t.Parallel()
			events := map[string]int{}
			installs := 0
			for seed := uint64(1); seed <= uint64(schedules); seed++ {
				sc, res := runScenario(seed, it.shape, nil, nil)
				for k, v := range res.events {
					events[k] += v
				}
				if res.installed {
					installs++
				}
				if len(res.violations) > 0 {
					t.Fatalf("%s, %s\n  %v", it.name, sc, res.violations)
				}
			}
			if err := it.arose(events, installs, schedules); err != nil {
				t.Fatalf("the schedules did not provoke the item: %v (events %v)", err, events)
			}
		})
	}
}

// simItem is a schedule shape aimed at one defect, and the check that the
// schedules really met it.
type simItem struct {
	name  string
	shape func(*simSchedule)
	// arose checks that the schedules met the situation.
	arose func(events map[string]int, installs, schedules int) error
}

// simNoFaults clears the faults, kills, reloads, installs and spent seed a
// seed chose, for an item that sets its own.
func simNoFaults(sc *simSchedule) {
	sc.faults = simFaults{}
	sc.killEvery = 0
	sc.closes, sc.installs, sc.deadSeed = false, false, false
}

// simItems are the defects of the earlier protocol that
// TestSimulationRegressions aims at, each named for what must hold.
var simItems = []simItem{
	{
		// 1: a failed write of the new pair must not release the lease:
		// nobody may refresh from the stale stored pair.
		name: "01_failed_write_keeps_lease",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.instances = 2 + int(sc.seed%3)
			sc.faults.storeFail = 0.3
		},
		arose: atLeast("persist_failed", 1.0/6),
	},
	{
		// 2: a terminal answer for a seed while a record appears (a
		// login install, a second replica) must not panic.
		name: "02_terminal_seed_with_record_appearing",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.deadSeed, sc.instances = true, 2+int(sc.seed%3)
		},
		arose: func(ev map[string]int, installs, schedules int) error {
			if ev["invalid_grant"] == 0 || installs < schedules/3 {
				return fmt.Errorf("%d terminal answers, %d installs", ev["invalid_grant"], installs)
			}
			return nil
		},
	},
	{
		// 3: the lease must outlive the token call and a slow write.
		name: "03_slow_writes_within_the_lease",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.instances = 3
			sc.faults.slowStorage, sc.faults.endpointSlow = 0.2, 0.2
		},
		arose: atLeast("ok", 3),
	},
	{
		// 4: skewed clocks and different timeouts must not let two
		// instances hold the lease (the I3 check runs on every call).
		name: "04_skewed_clocks_and_different_timeouts",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.instances = 4
			sc.skews = []time.Duration{0, 97 * time.Second, -194 * time.Second, 291 * time.Second}
			sc.timeouts = []time.Duration{time.Second, 20 * time.Second, 2 * time.Second, 10 * time.Second}
			sc.ahead = []time.Duration{sc.lifetime / 3, sc.lifetime / 4, sc.lifetime / 3, sc.lifetime / 5}
			sc.killEvery = sc.lifetime / 2
		},
		arose: atLeast("ok", 3),
	},
	{
		// 5: a failed lease read is never "no lease".
		name: "05_failed_lease_reads",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.instances = 3
			sc.faults.loadFail = 0.25
		},
		arose: atLeast("state_backoff", 3),
	},
	{
		// 6: a record that could not be read is never overwritten.
		name: "06_failed_reads_before_writes",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.instances = 2
			sc.faults.loadFail, sc.faults.storeFail = 0.2, 0.1
			sc.installs = true
		},
		arose: atLeast("state_backoff", 3),
	},
	{
		// 7: an instance in backoff adopts a good pair another stored.
		name: "07_backoff_adopts_stored_pair",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.instances = 3
			sc.faults.endpoint5xx = 0.4
		},
		arose: atLeast("adopted", 1),
	},
	{
		// 9: dead refresh tokens are remembered in storage: restarts with
		// stale seeds and kills never resend one.
		name: "09_dead_tokens_survive_restarts",
		shape: func(sc *simSchedule) {
			simNoFaults(sc)
			sc.deadSeed, sc.instances, sc.killEvery = true, 3, sc.lifetime/3
		},
		arose: atLeast("invalid_grant", 1.0/3),
	},
}

// atLeast checks that event happened perSchedule times per schedule run.
func atLeast(event string, perSchedule float64) func(map[string]int, int, int) error {
	return func(ev map[string]int, _, schedules int) error {
		if n := int(perSchedule * float64(schedules)); ev[event] < n {
			return fmt.Errorf("%d %q events, want at least %d", ev[event], event, n)
		}
		return nil
	}
}
