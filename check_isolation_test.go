package main

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestHungChecksDoNotStarveNeighbours: 40 checks hang on one host:port (a 1 h Timeout, a target that
// never answers them); a healthy check on the same host:port keeps running on schedule, so when its
// own endpoint fails the catalog shows it critical within interval + 1 s.
func TestHungChecksDoNotStarveNeighbours(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client
	tg := crNewTarget(t)
	release := make(chan struct{})
	tg.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasPrefix(r.URL.Path, "/hang/") {
			return false
		}
		select {
		case <-r.Context().Done():
		case <-release:
		}
		return true
	}
	t.Cleanup(func() { close(release) }) // runs before the target's Close, which waits for handlers

	r := crStart(t, srv, nil, nil)
	const hung = 40
	interval := time.Second
	for i := range hung {
		crRegister(t, c, "iso-node", fmt.Sprintf("hang%d", i), catalogRegisterCheck{
			CheckID: fmt.Sprintf("hang%d", i), Status: statusPassing,
			Definition: checkDefinition{HTTP: fmt.Sprintf("%s/hang/%d", tg.URL, i),
				Interval: durationField(interval), Timeout: durationField(time.Hour)},
		})
	}
	crRegister(t, c, "iso-node", "web", crHTTPCheck("web-ok", tg.URL+"/ok", interval))
	r.SetNodes([]string{"iso-node"})
	crWaitCheck(t, c, "iso-node", "web-ok", 10*time.Second, crStatus(statusPassing, "200 OK"))
	// Every hung check is due within one interval of the first result; give them two.
	started := 0
	for deadline := time.Now().Add(2 * interval); started < hung && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		started = 0
		for i := range hung {
			if tg.count(fmt.Sprintf("/hang/%d", i)) > 0 {
				started++
			}
		}
	}
	t.Logf("%d of %d hung checks in flight", started, hung)

	runs := tg.count("/ok")
	tg.code.Store(http.StatusInternalServerError)
	failed := time.Now()
	crWaitCheck(t, c, "iso-node", "web-ok", 10*time.Second, crStatus(statusCritical, "500 Internal Server Error"))
	if took := time.Since(failed); took > interval+time.Second {
		t.Fatalf("the healthy check turned critical %s after its target failed, want within %s (interval + 1s)",
			took.Round(10*time.Millisecond), interval+time.Second)
	}
	if tg.count("/ok") == runs {
		t.Fatal("the healthy check did not run while the others hung")
	}
}
