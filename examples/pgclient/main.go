// Command pgclient is a PostgreSQL client (github.com/lib/pq through database/sql), with
// ground truth: -conns connections, each running -query in a loop with a random think time
// in [-think-min, -think-max] after each, until -duration is over.
//
//	pgclient -dsn 'host=127.0.0.1 port=5432 user=postgres dbname=postgres sslmode=disable' \
//	    -conns 4 -query 'SELECT pg_sleep(0.05)' -think-max 100ms -duration 5s -truth q.jsonl
//
// lib/pq is a Debian package (golang-github-lib-pq-dev), not a module here: scripts/setup-go.sh
// builds this in GOPATH mode (GO111MODULE=off GOPATH=/usr/share/gocode).
//
// The query goes through db.Exec without arguments: lib/pq sends it as one simple-protocol
// Query message and reads the whole answer (RowDescription ... ReadyForQuery, which the server
// sends together when the query ends), so each query is one write and one read that waits for
// the server: a read that parks for the query's server time (pg_sleep's 50 ms and a little).
// Each connection is a *sql.DB of its own holding one connection, dialed through a dialer that
// remembers its local port, so the truth can name the socket, and wraps it to stamp each
// query at the socket.
//
// Ground truth, one JSON line per query in -truth FILE (stdout when empty), CLOCK_MONOTONIC ns
// (the clock of bpf_ktime_get_ns): just before db.Exec and just after it returned (start_ns,
// end_ns), and at the socket (timedConn): when the query's Write returned, when the Read of
// its answer began and returned:
//
//	{"kind":"query","local_port":L,"remote_port":R,"start_ns":..,"end_ns":..,"rtt_ns":..,
//	 "sent_ns":..,"read_start_ns":..,"read_end_ns":..,"think_ns":..,"err":null}
//
// and a JSON summary on stdout at the end ({"queries": N, "errors": N, "mean_ms": ..}). SIGTERM
// or SIGINT ends the run early, as -duration would (each connection finishes its query).
package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/lib/pq"
)

var (
	dsn       = flag.String("dsn", "", "lib/pq connection string, e.g. 'host=127.0.0.1 port=5432 user=postgres sslmode=disable' (required)")
	conns     = flag.Int("conns", 4, "concurrent connections")
	query     = flag.String("query", "SELECT pg_sleep(0.05)", "the query each connection runs in a loop")
	thinkMin  = flag.Duration("think-min", 0, "least think time after each query")
	thinkMax  = flag.Duration("think-max", 100*time.Millisecond, "most think time after each query")
	duration  = flag.Duration("duration", 5*time.Second, "how long to run")
	seed      = flag.Int64("seed", 1, "random seed of the think times")
	truthPath = flag.String("truth", "", "JSON Lines file of every query (ground truth); empty = stdout")
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

// dialer is lib/pq's Dialer that remembers the ports of the connection it made, wrapped to
// stamp its queries.
type dialer struct {
	d            net.Dialer
	lport, rport int
	conn         *timedConn
}

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

func (d *dialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

func (d *dialer) DialTimeout(network, address string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return d.DialContext(ctx, network, address)
}

func (d *dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := d.d.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		d.lport = a.Port
	}
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		d.rport = a.Port
	}
	d.conn = &timedConn{Conn: c}
	return d.conn, nil
}

type result struct {
	queries, errors int
	sum             time.Duration
	lines           []map[string]any
	err             error
}

func worker(i int, res *result, deadline time.Time) {
	connector, err := pq.NewConnector(*dsn)
	if err != nil {
		res.err = err
		return
	}
	d := &dialer{}
	connector.Dialer(d)
	db := sql.OpenDB(connector)
	defer db.Close()
	db.SetMaxOpenConns(1) // one connection, kept: every query on the same socket
	db.SetMaxIdleConns(1)
	if _, err := db.Exec("SELECT 1"); err != nil { // connect (and authenticate) outside the truth
		res.err = err
		return
	}
	rng := rand.New(rand.NewSource(*seed + int64(i)))
	for time.Now().Before(deadline) && !stopped() {
		start := monoNs()
		_, err := db.Exec(*query)
		end := monoNs()
		sent, readStart, readEnd := d.conn.stamps()
		think := *thinkMin
		if span := *thinkMax - *thinkMin; span > 0 {
			think += time.Duration(rng.Int63n(int64(span) + 1))
		}
		var e any
		if err != nil {
			e = err.Error()
			res.errors++
		}
		res.lines = append(res.lines, map[string]any{"kind": "query", "local_port": d.lport,
			"remote_port": d.rport, "start_ns": start, "end_ns": end, "rtt_ns": end - start,
			"sent_ns": sent, "read_start_ns": readStart, "read_end_ns": readEnd,
			"think_ns": int64(think), "err": e})
		res.queries++
		res.sum += time.Duration(end - start)
		if err != nil {
			time.Sleep(10 * time.Millisecond) // a failing server: do not spin
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
	if *dsn == "" || *conns <= 0 || *thinkMax < *thinkMin {
		fmt.Fprintln(os.Stderr, "pgclient: need -dsn, -conns > 0, -think-max >= -think-min")
		os.Exit(2)
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
		go func(i int) { defer wg.Done(); worker(i, &results[i], deadline) }(i)
	}
	wg.Wait()
	// the truth is written at the end, so logging costs nothing while querying
	out := os.Stdout
	if *truthPath != "" {
		f, err := os.Create(*truthPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pgclient:", err)
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
		fmt.Fprintln(os.Stderr, "pgclient:", err)
		os.Exit(1)
	}
	if out != os.Stdout {
		out.Close()
	}
	mean := 0.0
	if queries > 0 {
		mean = float64(sum.Microseconds()) / float64(queries) / 1e3
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"conns": *conns, "query": *query,
		"queries": queries, "errors": errs, "mean_ms": mean, "failures": failures})
	if errs > 0 || len(failures) > 0 {
		os.Exit(1)
	}
}
