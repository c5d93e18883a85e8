package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestTermContract(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	a := leaseAgent(t, srv)
	ctx := context.Background()
	newSess := func(t *testing.T, ctx context.Context) *session {
		t.Helper()
		s, err := newSession(ctx, a, testSessionEntry(a))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close(context.Background()) })
		return s
	}
	holder := func(t *testing.T, key string) string {
		t.Helper()
		pair, _, err := srv.Client.KV().Get(key, nil)
		if err != nil {
			t.Fatal(err)
		}
		if pair == nil {
			return ""
		}
		return pair.Session
	}

	t.Run("one term at a time; resigning hands over at once", func(t *testing.T) {
		key := "election/handover"
		s1, s2 := newSess(t, ctx), newSess(t, ctx)
		t1, err := campaign(ctx, a, s1, key)
		if err != nil {
			t.Fatal(err)
		}
		if holder(t, key) != s1.ID() {
			t.Fatalf("key held by %q, want the winner %q", holder(t, key), s1.ID())
		}
		type result struct {
			t   *term
			err error
		}
		second := make(chan result, 1)
		go func() {
			t2, err := campaign(ctx, a, s2, key)
			second <- result{t2, err}
		}()
		// Negative window: the second campaign must not win while the first term holds the key.
		select {
		case r := <-second:
			t.Fatalf("second campaign ended while the key was held: %v", r.err)
		case <-time.After(500 * time.Millisecond):
		}
		if err := t1.Close(ctx); err != nil {
			t.Fatal(err)
		}
		waitClosed(t, t1.Done(), time.Second, "Done after Close")
		select {
		case r := <-second:
			if r.err != nil {
				t.Fatal(r.err)
			}
			defer r.t.Close(ctx)
		case <-time.After(5 * time.Second):
			t.Fatal("second campaign did not win after the first term resigned")
		}
		if holder(t, key) != s2.ID() {
			t.Errorf("key held by %q, want %q", holder(t, key), s2.ID())
		}
	})

	t.Run("Done closes when the key is taken away", func(t *testing.T) {
		key := "election/taken"
		tm, err := campaign(ctx, a, newSess(t, ctx), key)
		if err != nil {
			t.Fatal(err)
		}
		defer tm.Close(ctx)
		if tm.Err() != nil {
			t.Errorf("Err before Done = %v", tm.Err())
		}
		if _, err := srv.Client.KV().Delete(key, nil); err != nil {
			t.Fatal(err)
		}
		waitClosed(t, tm.Done(), 5*time.Second, "Done after the key was deleted")
		if err := tm.Err(); err == nil || !strings.Contains(err.Error(), "no longer held by our session") {
			t.Errorf("Err = %v", err)
		}
	})

	t.Run("Done closes when the session stops being refreshed", func(t *testing.T) {
		key := "election/session"
		sctx, cancel := context.WithCancel(ctx)
		s := newSess(t, sctx)
		tm, err := campaign(ctx, a, s, key)
		if err != nil {
			t.Fatal(err)
		}
		defer tm.Close(ctx)
		cancel() // the key is still held, but nothing renews the session any more
		waitClosed(t, tm.Done(), time.Second, "Done after the session's renewal stopped")
		if !errors.Is(tm.Err(), context.Canceled) {
			t.Errorf("Err = %v, want the session's error", tm.Err())
		}
	})

	t.Run("a campaign fails when its session is lost first", func(t *testing.T) {
		key := "election/lost"
		tm, err := campaign(ctx, a, newSess(t, ctx), key)
		if err != nil {
			t.Fatal(err)
		}
		defer tm.Close(ctx)
		s2 := newSess(t, ctx)
		if _, err := srv.Client.Session().Destroy(s2.ID(), nil); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := campaign(ctx, a, s2, key)
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "leader session: session was invalidated") {
				t.Errorf("campaign = %v, want the session's loss", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("campaign with a lost session did not end")
		}
	})
}
