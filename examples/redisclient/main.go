// Command redisclient is a Redis client (github.com/gomodule/redigo), with ground truth:
// -conns connections, each running -cmd in a loop with a random think time in
// [-think-min, -think-max] after each, until -duration is over.
//
//	redisclient -addr 127.0.0.1:6379 -conns 4 -cmd 'BLPOP otelwater:empty 0.05' \
//	    -think-max 100ms -duration 5s -truth q.jsonl
//
// redigo is a Debian package (golang-github-gomodule-redigo-dev), not a module here:
// scripts/setup-go.sh builds this in GOPATH mode (GO111MODULE=off GOPATH=/usr/share/gocode).
//
// conn.Do writes the command, flushes it and reads the reply: one write and one read that waits
// for the server. Slow commands with a known server time: BLPOP on a list no one pushes to
// times out after its timeout (each connection waits on its own, but Redis notices a blocked
// client's timeout on its event loop's clock: start redis-server with a high --hz), and
// DEBUG SLEEP (exact, but it stops the whole single-threaded server, so the connections'
// sleeps queue behind each other; needs --enable-debug-command).
//
// Ground truth, one JSON line per command in -truth FILE (stdout when empty), CLOCK_MONOTONIC
// ns (the clock of bpf_ktime_get_ns): just before conn.Do and just after it returned
// (start_ns, end_ns), and at the socket (the connection is wrapped: timedConn): when the
// command's Write returned, when the Read of its reply began and returned:
//
//	{"kind":"query","local_port":L,"remote_port":R,"start_ns":..,"end_ns":..,"rtt_ns":..,
//	 "sent_ns":..,"read_start_ns":..,"read_end_ns":..,"think_ns":..,"err":null}
//
// and a JSON summary on stdout at the end ({"queries": N, "errors": N, "mean_ms": ..}). SIGTERM
// or SIGINT ends the run early, as -duration would (each connection finishes its query).
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/gomodule/redigo/redis"
)

var (
	addr      = flag.String("addr", "", "redis-server host:port (required)")
	conns     = flag.Int("conns", 4, "concurrent connections")
	cmd       = flag.String("cmd", "BLPOP otelwater:empty 0.05", "the command each connection runs in a loop (words split on spaces)")
	thinkMin  = flag.Duration("think-min", 0, "least think time after each command")
	thinkMax  = flag.Duration("think-max", 100*time.Millisecond, "most think time after each command")
	duration  = flag.Duration("duration", 5*time.Second, "how long to run")
	seed      = flag.Int64("seed", 1, "random seed of the think times")
	truthPath = flag.String("truth", "", "JSON Lines file of every command (ground truth); empty = stdout")
)

// Monotonic time, as the other examples take it: calibrate time.Now against
// clock_gettime(CLOCK_MONOTONIC) once, then each reading is time.Since plus a fixed offset.
var (
	monoBase  int64
	monoStart time.Time
)

func clockMonotonic() int64 {
	var ts syscall.Timespec
	syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

func calibrate() {
	best := time.Duration(1 << 62)
	for i := 0; i < 16; i++ {
		t0 := time.Now()
		m := clockMonotonic()
		t1 := time.Now()
		if gap := t1.Sub(t0); gap < best {
			best, monoStart, monoBase = gap, t0, m-int64(gap/2)
		}
	}
}

func monoNs() int64 { return monoBase + int64(time.Since(monoStart)) }

// timedConn stamps, on the monotonic clock, when each Write returned and when the first Read
// after it began and returned: the query's truth at the socket (sent_ns, read_start_ns,
// read_end_ns), free of the client's own delays before it sent the query (a GC, the OS) and
// after it had the answer, which the round trip (start_ns to end_ns) includes.
type timedConn struct {
	net.Conn
	sent, readStart, readEnd int64 // atomics: the last Write's, its first Read's
	armed                    int32 // a Write since the last stamped Read
}

func (c *timedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	atomic.StoreInt64(&c.sent, monoNs())
	atomic.StoreInt32(&c.armed, 1)
	return n, err
}

func (c *timedConn) Read(b []byte) (int, error) {
	if atomic.LoadInt32(&c.armed) == 0 {
		return c.Conn.Read(b)
	}
	start := monoNs()
	n, err := c.Conn.Read(b)
	end := monoNs()
	if atomic.CompareAndSwapInt32(&c.armed, 1, 0) {
		atomic.StoreInt64(&c.readStart, start)
		atomic.StoreInt64(&c.readEnd, end)
	}
	return n, err
}

// stamps of the last query: when it was sent, when the Read of its answer began and returned
func (c *timedConn) stamps() (sent, readStart, readEnd int64) {
	return atomic.LoadInt64(&c.sent), atomic.LoadInt64(&c.readStart), atomic.LoadInt64(&c.readEnd)
}

type result struct {
	queries, errors int
	sum             time.Duration
	lines           []map[string]any
	err             error
}

func worker(i int, res *result, deadline time.Time, name string, args []any) {
	var lport, rport int
	var tc *timedConn
	c, err := redis.Dial("tcp", *addr, redis.DialNetDial(func(network, address string) (net.Conn, error) {
		nc, err := net.Dial(network, address)
		if err != nil {
			return nil, err
		}
		lport, rport = nc.LocalAddr().(*net.TCPAddr).Port, nc.RemoteAddr().(*net.TCPAddr).Port
		tc = &timedConn{Conn: nc}
		return tc, nil
	}))
	if err != nil {
		res.err = err
		return
	}
	defer c.Close()
	rng := rand.New(rand.NewSource(*seed + int64(i)))
	for time.Now().Before(deadline) && !stopped() {
		start := monoNs()
		_, err := c.Do(name, args...)
		end := monoNs()
		sent, readStart, readEnd := tc.stamps()
		think := *thinkMin
		if span := *thinkMax - *thinkMin; span > 0 {
			think += time.Duration(rng.Int63n(int64(span) + 1))
		}
		var e any
		if err != nil {
			e = err.Error()
			res.errors++
		}
		res.lines = append(res.lines, map[string]any{"kind": "query", "local_port": lport,
			"remote_port": rport, "start_ns": start, "end_ns": end, "rtt_ns": end - start,
			"sent_ns": sent, "read_start_ns": readStart, "read_end_ns": readEnd,
			"think_ns": int64(think), "err": e})
		res.queries++
		res.sum += time.Duration(end - start)
		if err != nil {
			if c.Err() != nil { // the connection is broken: no more truth from it
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		pause(think)
	}
}

// stop is closed on SIGTERM/SIGINT: each connection ends after its query in flight, and the
// truth of every query done is written as at the end of -duration.
var stop = make(chan struct{})

func stopped() bool {
	select {
	case <-stop:
		return true
	default:
		return false
	}
}

// pause sleeps d, or less when stopped.
func pause(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-stop:
	}
}

func main() {
	flag.Parse()
	words := strings.Fields(*cmd)
	if *addr == "" || len(words) == 0 || *conns <= 0 || *thinkMax < *thinkMin {
		fmt.Fprintln(os.Stderr, "redisclient: need -addr, -cmd, -conns > 0, -think-max >= -think-min")
		os.Exit(2)
	}
	args := make([]any, 0, len(words)-1)
	for _, w := range words[1:] {
		args = append(args, w)
	}
	calibrate()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; close(stop) }()
	results := make([]result, *conns)
	var wg sync.WaitGroup
	deadline := time.Now().Add(*duration)
	for i := range results {
		wg.Add(1)
		go func(i int) { defer wg.Done(); worker(i, &results[i], deadline, words[0], args) }(i)
	}
	wg.Wait()
	// the truth is written at the end, so logging costs nothing while the commands run
	out := os.Stdout
	if *truthPath != "" {
		f, err := os.Create(*truthPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "redisclient:", err)
			os.Exit(1)
		}
		out = f
	}
	w := bufio.NewWriter(out)
	var queries, errs int
	var sum time.Duration
	var failures []string
	for _, r := range results {
		for _, l := range r.lines {
			b, _ := json.Marshal(l)
			w.Write(append(b, '\n'))
		}
		queries, errs, sum = queries+r.queries, errs+r.errors, sum+r.sum
		if r.err != nil {
			failures = append(failures, r.err.Error())
		}
	}
	if err := w.Flush(); err != nil {
		fmt.Fprintln(os.Stderr, "redisclient:", err)
		os.Exit(1)
	}
	if out != os.Stdout {
		out.Close()
	}
	mean := 0.0
	if queries > 0 {
		mean = float64(sum.Microseconds()) / float64(queries) / 1e3
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"conns": *conns, "cmd": *cmd,
		"queries": queries, "errors": errs, "mean_ms": mean, "failures": failures})
	if errs > 0 || len(failures) > 0 {
		os.Exit(1)
	}
}
