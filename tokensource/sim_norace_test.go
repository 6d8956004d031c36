//go:build !race

package tokensource

// simDefaultSchedules is how many schedules TestSimulation runs by default.
const simDefaultSchedules = 20000

// simItemSchedules is how many schedules each named item scenario runs.
const simItemSchedules = 300
