package main

import (
	"bufio"
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// TestExitStatusTable checks the README's exit-status table against the
// exit* constants of this package, read from the sources rather than from
// a copied list: scripts rely on the table, and it is written by hand.
func TestExitStatusTable(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	consts, err := exitConstants(".")
	if err != nil {
		t.Fatal(err)
	}
	if len(consts) < 2 {
		t.Fatalf("found only %d exit* constants in cmd/ferry: is the parser looking at the right files?", len(consts))
	}
	rows, err := exitTable(readme)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range exitMismatches(consts, rows) {
		t.Error(p)
	}
}

// TestExitStatusTableMismatches: the comparison names a status missing
// from the table, a row no constant has, and a number used twice.
func TestExitStatusTableMismatches(t *testing.T) {
	consts := map[string]int{"exitOK": 0, "exitBusy": 27, "exitA": 5, "exitB": 5}
	rows := []exitRow{{0, "success"}, {5, "a"}, {31, "something new"}, {0, "success again"}}
	got := exitMismatches(consts, rows)
	for _, want := range []string{
		"exit status 27 (exitBusy in cmd/ferry) has no row in README.md's exit-status table",
		`README.md's exit-status table has a row for 31 ("something new") but no exit* constant in cmd/ferry has that value`,
		"README.md's exit-status table has 2 rows for 0",
		"exitA and exitB in cmd/ferry are both 5: each exit status must mean one kind of failure",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("mismatches %q lack %q", got, want)
		}
	}
	if len(got) != 4 {
		t.Errorf("mismatches = %q, want exactly 4", got)
	}
	if got := exitMismatches(map[string]int{"exitOK": 0, "exitX": 3}, []exitRow{{3, "x"}, {0, "ok"}}); len(got) != 0 {
		t.Errorf("matching table and constants: %q", got)
	}
}

// TestExitConstantsParsed: constants are read however they are written
// (iota, expressions, several blocks, other files), and nothing else is.
func TestExitConstantsParsed(t *testing.T) {
	dir := t.TempDir()
	write := func(name, src string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("exit.go", `package main
import "time"
const (
	exitOK = iota
	exitFailure
	exitUsage // a comment
)
const exitBusy = 27
const (
	exitLater = exitBusy + 1
	exitit    = 99          // not exit + capital letter
	timeout   = time.Second // not an exit status, and needs an import
)
var exitCodes = []int{exitOK}
`)
	write("other.go", "package main\n\nconst exitPeer = 29\n")
	write("other_test.go", "package main\n\nconst exitTestOnly = 99\n")
	got, err := exitConstants(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"exitOK": 0, "exitFailure": 1, "exitUsage": 2, "exitBusy": 27, "exitLater": 28, "exitPeer": 29}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("exitConstants = %v, want %v", got, want)
	}
}

// exitConstants returns the value of each constant named exit + capital
// letter in the non-test Go files of dir. Only those declarations are
// type-checked (in a file of their own), so they may use iota or refer to
// one another but need nothing else of the package.
func exitConstants(dir string) (map[string]int, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return nil, err
	}
	fset := token.NewFileSet()
	synth := &ast.File{Name: ast.NewIdent("exitstatuses")}
	for _, p := range paths {
		if strings.HasSuffix(p, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			return nil, err
		}
		for _, d := range f.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			// Keep the whole block, so that iota and implicit repetition
			// keep their meaning, but blank the other constants' names and
			// give those with values of their own zeros, so that they need
			// nothing of the package.
			keep := &ast.GenDecl{Tok: token.CONST, Lparen: gd.Lparen}
			found := false
			for _, s := range gd.Specs {
				vs := *s.(*ast.ValueSpec)
				mine := false
				vs.Names = slices.Clone(vs.Names)
				for i, n := range vs.Names {
					if isExitName(n.Name) {
						mine = true
					} else {
						vs.Names[i] = ast.NewIdent("_")
					}
				}
				if !mine && len(vs.Values) > 0 {
					vs.Type = nil
					vs.Values = make([]ast.Expr, len(vs.Values))
					for i := range vs.Values {
						vs.Values[i] = &ast.BasicLit{Kind: token.INT, Value: "0"}
					}
				}
				found = found || mine
				keep.Specs = append(keep.Specs, &vs)
			}
			if found {
				synth.Decls = append(synth.Decls, keep)
			}
		}
	}
	info := &types.Info{Defs: map[*ast.Ident]types.Object{}}
	if _, err := (&types.Config{}).Check("exitstatuses", fset, []*ast.File{synth}, info); err != nil {
		return nil, fmt.Errorf("evaluating the exit* constants of %s: %w", dir, err)
	}
	out := map[string]int{}
	for id, obj := range info.Defs {
		c, ok := obj.(*types.Const)
		if !ok || !isExitName(id.Name) {
			continue
		}
		v, err := strconv.Atoi(c.Val().ExactString())
		if err != nil {
			return nil, fmt.Errorf("%s = %s is not an integer", id.Name, c.Val())
		}
		out[id.Name] = v
	}
	return out, nil
}

func isExitName(n string) bool {
	rest, ok := strings.CutPrefix(n, "exit")
	return ok && rest != "" && unicode.IsUpper(rune(rest[0]))
}

type exitRow struct {
	status  int
	meaning string
}

var tableRow = regexp.MustCompile(`^\|\s*([^|]*?)\s*\|\s*(.*?)\s*\|\s*$`)

// exitTable returns the rows of the table under the README's
// "### Exit statuses" heading: "| status | meaning |" lines, the header and
// its separator left out.
func exitTable(readme []byte) ([]exitRow, error) {
	sc := bufio.NewScanner(bytes.NewReader(readme))
	in := false
	var rows []exitRow
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") {
			if in {
				break
			}
			in = line == "### Exit statuses"
			continue
		}
		if !in {
			continue
		}
		m := tableRow.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if m[1] == "status" || strings.Trim(m[1], "-: ") == "" {
			continue // header, separator
		}
		n, err := strconv.Atoi(m[1])
		if err != nil {
			return nil, fmt.Errorf("README.md's exit-status table: row %q does not start with a number", line)
		}
		rows = append(rows, exitRow{n, m[2]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf(`README.md has no "### Exit statuses" heading followed by a "| status | meaning |" table`)
	}
	return rows, nil
}

// exitMismatches lists, one sentence each, the statuses the table lacks,
// the rows no constant has, and numbers used twice on either side.
func exitMismatches(consts map[string]int, rows []exitRow) []string {
	var out []string
	byValue := map[int][]string{}
	for name, v := range consts {
		byValue[v] = append(byValue[v], name)
	}
	inTable := map[int]int{}
	for _, r := range rows {
		inTable[r.status]++
	}
	values := make([]int, 0, len(byValue))
	for v := range byValue {
		values = append(values, v)
	}
	slices.Sort(values)
	for _, v := range values {
		names := byValue[v]
		slices.Sort(names)
		if len(names) > 1 {
			out = append(out, fmt.Sprintf("%s in cmd/ferry are both %d: each exit status must mean one kind of failure",
				strings.Join(names, " and "), v))
		}
		if inTable[v] == 0 {
			out = append(out, fmt.Sprintf("exit status %d (%s in cmd/ferry) has no row in README.md's exit-status table",
				v, strings.Join(names, ", ")))
		}
	}
	seen := map[int]bool{}
	for _, r := range rows {
		if len(byValue[r.status]) == 0 {
			out = append(out, fmt.Sprintf("README.md's exit-status table has a row for %d (%q) but no exit* constant in cmd/ferry has that value",
				r.status, r.meaning))
		}
		if inTable[r.status] > 1 && !seen[r.status] {
			out = append(out, fmt.Sprintf("README.md's exit-status table has %d rows for %d", inTable[r.status], r.status))
		}
		seen[r.status] = true
	}
	return out
}
