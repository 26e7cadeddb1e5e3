package main

import (
	"slices"
	"testing"
)

func TestInterspersed(t *testing.T) {
	app := newApp()
	for _, tc := range []struct{ in, want []string }{
		{[]string{"ferry", "checkpoint", "job", "-o", "f.ferry", "--leave-running"}, []string{"ferry", "checkpoint", "-o", "f.ferry", "--leave-running", "job"}},
		{[]string{"ferry", "--root", "/r", "migrate", "j", "--to", "a:1", "--json"}, []string{"ferry", "--root", "/r", "migrate", "--to", "a:1", "--json", "j"}},
		{[]string{"ferry", "restore", "-", "--name", "x"}, []string{"ferry", "restore", "--name", "x", "-"}},
		{[]string{"ferry", "checkpoint", "--level=3", "job"}, []string{"ferry", "checkpoint", "--level=3", "job"}},
		{[]string{"ferry", "run", "--name", "x", "--", "sh", "-c", "true"}, []string{"ferry", "run", "--name", "x", "--", "sh", "-c", "true"}},
		{[]string{"ferry", "logs", "job", "-f"}, []string{"ferry", "logs", "-f", "job"}},
		{[]string{"ferry", "kill", "a", "--", "-b"}, []string{"ferry", "kill", "a", "--", "-b"}},
		{[]string{"ferry"}, []string{"ferry"}},
	} {
		if got := interspersed(app, tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("%q: got %q, want %q", tc.in, got, tc.want)
		}
	}
}
