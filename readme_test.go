package main

import (
	"os"
	"strings"
	"testing"
)

// TestReadmeDocumentsEveryConfigKey keeps the README's config reference in step with config.go.
func TestReadmeDocumentsEveryConfigKey(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, key := range configFileKeys() {
		short := strings.TrimPrefix(key, "telemetry.")
		if !strings.Contains(readme, "| `"+short+"` |") {
			t.Errorf("README config reference has no row for %q", key)
		}
	}
}
