//go:build !race

package tokensource

// simDefaultSchedules is how many schedules TestSimulation runs by default.
const simDefaultSchedules = 20000
