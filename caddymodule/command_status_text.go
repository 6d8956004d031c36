package caddymodule

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// cliWriteStatus prints the status command's text output: per account, its
// state, its stored chain and its lease.
func cliWriteStatus(w io.Writer, st cliStatus) error {
	fmt.Fprintf(w, "storage: %s\n", st.Storage)
	for _, a := range st.Accounts {
		state := string(a.State)
		if a.Error != "" {
			state += ": " + a.Error
		}
		fmt.Fprintf(w, "\naccount %q: %s\n", a.Account, state)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		cliWriteRecord(tw, a, st.CheckedAt)
		fmt.Fprintf(tw, "  lease\t%s\n", cliLeaseText(a, st.CheckedAt))
		if l := a.Lease; l != nil && l.Marked {
			which := "an earlier refresh token"
			if l.MarksStoredToken {
				which = "the stored refresh token"
			}
			fmt.Fprintf(tw, "  marked\t%s, by %s\n", which, l.MarkedBy)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// cliWriteRecord prints what the account's record holds: its chain, or its
// history only, or nothing.
func cliWriteRecord(tw io.Writer, a cliAccountStatus, now time.Time) {
	hasPair := a.Generation != 0 || a.Chain != ""
	if a.State == tokensource.RecordNoChain && a.ConsumedSeeds+a.DeadTokens == 0 {
		fmt.Fprintf(tw, "  record\tnothing stored at %s\n", a.Key)
	}
	if hasPair {
		fmt.Fprintf(tw, "  generation\t%d\n", a.Generation)
		fmt.Fprintf(tw, "  chain\t%s\n", a.Chain)
		fmt.Fprintf(tw, "  user\t%s\n", a.User)
		if len(a.Scope) > 0 {
			fmt.Fprintf(tw, "  scope\t%s\n", strings.Join(a.Scope, " "))
		}
		fmt.Fprintf(tw, "  issued\t%s\n", cliTime(a.IssuedAt, now))
		fmt.Fprintf(tw, "  access expires\t%s\n", cliTime(a.AccessExpiresAt, now))
		fmt.Fprintf(tw, "  refresh expires\t%s\n", cliTime(a.RefreshExpiresAt, now))
		fmt.Fprintf(tw, "  consumed seeds\t%d\n", a.ConsumedSeeds)
	} else if a.ConsumedSeeds+a.DeadTokens > 0 {
		fmt.Fprintf(tw, "  record\tno pair; %d consumed seeds, %d rejected tokens\n", a.ConsumedSeeds, a.DeadTokens)
	}
	if a.DeadTokens > 0 && hasPair {
		fmt.Fprintf(tw, "  rejected tokens\t%d\n", a.DeadTokens)
	}
}

// cliLeaseText says who holds the account's lease and until when, as far
// as storage (or Redis) tells.
func cliLeaseText(a cliAccountStatus, now time.Time) string {
	l := a.Lease
	switch {
	case a.LeaseError != "":
		return "unreadable: " + a.LeaseError
	case l == nil || l.Owner == "":
		return "free"
	case l.inRedis && l.TTLLeftMillis < 0:
		return fmt.Sprintf("held by %s, without expiry in Redis (the next instance to try for it gives it one TTL%s)", l.Owner, cliTTL(l.TTLMillis))
	case l.inRedis:
		ttl := ""
		if l.TTLMillis > 0 {
			ttl = ", TTL " + (time.Duration(l.TTLMillis) * time.Millisecond).String()
		}
		return fmt.Sprintf("held by %s, Redis ends it in %s (at %s%s)", l.Owner,
			(time.Duration(l.TTLLeftMillis) * time.Millisecond).Round(time.Millisecond), l.ExpiresAt.Format(time.RFC3339), ttl)
	case l.ExpiresAt.IsZero():
		return "held by " + l.Owner
	case l.Expired:
		return fmt.Sprintf("held by %s, expired %s by its holder's clock (instances take it over once they have seen it unchanged for its TTL%s)",
			l.Owner, cliTime(l.ExpiresAt, now), cliTTL(l.TTLMillis))
	}
	return fmt.Sprintf("held by %s until %s", l.Owner, cliTime(l.ExpiresAt, now))
}

func cliTTL(ms int64) string {
	if ms <= 0 {
		return ""
	}
	return ", " + (time.Duration(ms) * time.Millisecond).String()
}
