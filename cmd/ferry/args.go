package main

import (
	"strings"

	"github.com/urfave/cli/v2"
)

// interspersed lets flags follow a command's arguments, as in
// `ferry checkpoint JOB -o FILE` or `ferry migrate JOB --to ADDR`:
// urfave/cli stops at the first argument, so the command's flags are moved
// in front of its arguments. `run` is left alone: what follows its flags
// is a command line of its own. After "--" nothing is moved.
func interspersed(app *cli.App, args []string) []string {
	i := 1
	for i < len(args) && strings.HasPrefix(args[i], "-") && args[i] != "-" {
		if args[i] == "--" {
			return args
		}
		if takesValue(app.Flags, args[i]) {
			i++
		}
		i++
	}
	if i >= len(args) {
		return args
	}
	cmd := app.Command(args[i])
	if cmd == nil || cmd.Name == "run" {
		return args
	}
	var flags, params []string
	rest := args[i+1:]
	for j := 0; j < len(rest); j++ {
		a := rest[j]
		switch {
		case a == "--":
			params = append(params, rest[j:]...)
			j = len(rest)
		case strings.HasPrefix(a, "-") && a != "-":
			flags = append(flags, a)
			if takesValue(cmd.Flags, a) && j+1 < len(rest) {
				j++
				flags = append(flags, rest[j])
			}
		default:
			params = append(params, a)
		}
	}
	out := append(append([]string{}, args[:i+1]...), flags...)
	return append(out, params...)
}

// takesValue reports whether arg (-x, --name, not --name=value) is a flag
// of flags that takes a separate value.
func takesValue(flags []cli.Flag, arg string) bool {
	name := strings.TrimLeft(arg, "-")
	if strings.Contains(name, "=") {
		return false
	}
	for _, f := range flags {
		for _, n := range f.Names() {
			if n != name {
				continue
			}
			if bf, ok := f.(*cli.BoolFlag); ok && bf != nil {
				return false
			}
			return true
		}
	}
	return false
}
