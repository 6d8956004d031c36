//go:build race

package tokensource

// Under the race detector the simulation runs fewer schedules by default:
// it is there to check the harness for data races, and CI runs the full
// count without the detector.
const simDefaultSchedules = 500

// simItemSchedules is how many schedules each named item scenario runs.
const simItemSchedules = 60
