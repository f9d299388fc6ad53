// Command nonet is a test fixture: a Go program that does not use package net,
// so `otelwater locate` must say net.(*conn).Read is absent.
package main

import (
	"fmt"
	"os"
)

func main() { fmt.Fprintln(os.Stdout, "no network here") }
