// Command tracedapi is a traced HTTP service whose request goroutines carry their trace
// context as runtime/pprof profiler labels: what otelwater reads (in the kernel) to put a
// slow TCP read's span inside the trace of the request it served. Standard library only; no
// OpenTelemetry SDK, so the ids are made by hand the way the SDK makes them.
//
// How a service sets the labels (see api.handle below; with the OpenTelemetry Go SDK the ids
// come from trace.SpanContextFromContext(ctx) instead):
//
//	pprof.Do(ctx, pprof.Labels("trace_id", traceID, "span_id", spanID), func(ctx context.Context) {
//		... the handler: every Read this goroutine makes now names the request's span ...
//	})
//
// The labels belong to the goroutine that runs pprof.Do (and to goroutines it starts later,
// which inherit them). So a read is linked only when the labelled goroutine reads the
// connection itself. net/http's client reads responses in its Transport's own goroutine
// (persistConn.readLoop), started when the connection was dialled: it holds the labels of the
// request that dialled it, not of the one it is reading for, and otelwater does not link it.
//
// One binary, the mode by flag:
//
//	tracedapi -mode tcp-downstream -delay 30ms       # a line server: "ping X\n" -> "pong X\n"
//	tracedapi -mode http-downstream -delay 30ms      # a net/http server
//	tracedapi -mode api -downstream tcp:127.0.0.1:PORT     # pooled raw TCP, read by the handler
//	tracedapi -mode api -downstream http://127.0.0.1:PORT  # net/http client (readLoop reads)
//	tracedapi -mode client -target http://127.0.0.1:PORT/ -conns 4 -think-max 60ms -duration 5s
//
// The servers print {"listening": "127.0.0.1:PORT", "pid": N} as their first line on stdout
// and exit 0 on SIGTERM/SIGINT, after flushing their truth. The client prints a JSON summary.
// Try it with `otelwater watch --go-pid API_PID --otlp-endpoint http://localhost:4317`.
//
// Ground truth (-truth FILE, JSON Lines; times are CLOCK_MONOTONIC ns, bpf_ktime_get_ns's
// clock):
//
//	api, per request:
//	  {"kind":"call","trace_id":T,"span_id":S,"parent_span_id":P,"labels":true,
//	   "downstream":"tcp","goid":G,"local_port":L,"remote_port":R,
//	   "req_start_ns":..,"start_ns":..,"conn_ns":..,"end_ns":..,"req_end_ns":..,"err":null}
//	  (span_id: the api's own span; parent_span_id: the caller's, "" for a trace the api
//	  started; goid: the handler's goroutine; local_port/remote_port: the api's connection to
//	  the downstream; start_ns/end_ns: the downstream call, from its start to after its answer
//	  was read, and conn_ns when it had its connection (net/http's pool can hand a request
//	  the connection another is still finishing with); req_*: the whole request)
//	client, per request:
//	  {"kind":"request","trace_id":T,"span_id":C,"api_trace_id":T,"api_span_id":S,
//	   "local_port":L,"start_ns":..,"end_ns":..,"err":null}
//	  (trace_id, span_id: what it sent as traceparent, "" with -traceparent=false;
//	  api_trace_id, api_span_id: what the api answered in its traceparent header)
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	mrand "math/rand"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

var (
	mode       = flag.String("mode", "", "api, client, tcp-downstream or http-downstream (required)")
	addr       = flag.String("addr", "127.0.0.1:0", "servers: listen address")
	delay      = flag.Duration("delay", 30*time.Millisecond, "downstreams: sleep before each answer")
	downstream = flag.String("downstream", "", "api: tcp:HOST:PORT or http://HOST:PORT (required)")
	labels     = flag.Bool("labels", true, "api: run each request under pprof labels naming its span")
	traceKey   = flag.String("trace-key", "trace_id", "api: the label holding the trace id")
	spanKey    = flag.String("span-key", "span_id", "api: the label holding the span id")
	target     = flag.String("target", "", "client: URL to GET (required)")
	conns      = flag.Int("conns", 4, "client: concurrent keep-alive connections")
	thinkMin   = flag.Duration("think-min", 0, "client: least think time")
	thinkMax   = flag.Duration("think-max", 60*time.Millisecond, "client: most think time")
	duration   = flag.Duration("duration", 5*time.Second, "client: how long to run")
	sendTrace  = flag.Bool("traceparent", true, "client: start each trace, send it as traceparent")
	seed       = flag.Int64("seed", 1, "client: random seed of the think times")
	truthPath  = flag.String("truth", "", "JSON Lines file of the ground truth; empty = none")
)

// ---- the trace context (W3C Trace Context: traceparent = "00-TRACEID-SPANID-FLAGS") ----

// newID is n random bytes as lowercase hex: 16 for a trace id, 8 for a span id.
func newID(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func isHex(s string, n int) bool {
	if len(s) != n || strings.Trim(s, "0") == "" { // all zeros is invalid
		return false
	}
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// parseTraceparent returns the trace id and the caller's span id of a traceparent header.
func parseTraceparent(h string) (traceID, spanID string, ok bool) {
	p := strings.Split(strings.TrimSpace(h), "-")
	if len(p) < 4 || len(p[0]) != 2 || p[0] == "ff" || !isHex(p[1], 32) || !isHex(p[2], 16) {
		return "", "", false
	}
	return p[1], p[2], true
}

// ---- the api ----

// A downstream the api calls. What it says of each call, for the truth: the connection used
// (the api's end, the downstream's) and when the call had it in hand (the pool's connection,
// or a new one dialled).
type caller interface {
	call(ctx context.Context, traceID string) (c conn, err error)
}

type conn struct {
	LocalPort, RemotePort int
	GotNs                 int64
}

type api struct {
	down caller
	kind string // "tcp" or "http"
	log  *truth
}

// handle serves one request. The three steps of a traced service:
func (a *api) handle(w http.ResponseWriter, r *http.Request) {
	reqStart := monoNs()
	// 1. the request's trace: the caller's (its traceparent header), else a new one
	traceID, parentID, ok := parseTraceparent(r.Header.Get("traceparent"))
	if !ok {
		traceID, parentID = newID(16), ""
	}
	// 2. the api's own span in that trace (an SDK's tracer.Start makes it)
	spanID := newID(8)
	w.Header().Set("traceparent", "00-"+traceID+"-"+spanID+"-01")

	work := func(ctx context.Context) {
		start := monoNs()
		c, err := a.down.call(ctx, traceID) // the slow read happens in here
		end := monoNs()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
		} else {
			io.WriteString(w, "ok\n")
		}
		a.log.record(map[string]any{"kind": "call", "trace_id": traceID, "span_id": spanID,
			"parent_span_id": parentID, "labels": *labels, "downstream": a.kind, "goid": goid(),
			"local_port": c.LocalPort, "remote_port": c.RemotePort, "req_start_ns": reqStart,
			"start_ns": start, "conn_ns": c.GotNs, "end_ns": end, "req_end_ns": monoNs(),
			"err": errText(err)})
	}
	// 3. run the work with the span as this goroutine's profiler labels: pprof.Do sets them
	// for the duration of the call (and puts the previous ones back after it)
	if *labels {
		pprof.Do(r.Context(), pprof.Labels(*traceKey, traceID, *spanKey, spanID), work)
	} else {
		work(r.Context())
	}
}

// tcpCaller speaks a line protocol over pooled raw TCP connections. The handler's goroutine
// writes the request and reads the answer itself: the slow read is in the labelled goroutine.
type tcpCaller struct {
	addr string
	idle chan *lineConn // the pool: connections no request holds
}

type lineConn struct {
	net.Conn
	r *bufio.Reader
}

func (t *tcpCaller) call(ctx context.Context, traceID string) (conn, error) {
	var c *lineConn
	select {
	case c = <-t.idle:
	default:
		var d net.Dialer
		nc, err := d.DialContext(ctx, "tcp", t.addr)
		if err != nil {
			return conn{}, err
		}
		c = &lineConn{Conn: nc, r: bufio.NewReader(nc)}
	}
	info := conn{port(c.LocalAddr()), port(c.RemoteAddr()), monoNs()}
	_, err := io.WriteString(c, "ping "+traceID+"\n")
	var line string
	if err == nil {
		line, err = c.r.ReadString('\n') // parks until the downstream answers: the slow read
	}
	if err == nil && line != "pong "+traceID+"\n" {
		err = fmt.Errorf("downstream answered %q", line)
	}
	if err != nil {
		c.Close()
		return info, err
	}
	select {
	case t.idle <- c: // back to the pool
	default:
		c.Close()
	}
	return info, nil
}

// httpCaller uses one net/http client (keep-alive). Its Transport reads each connection in a
// goroutine of its own (persistConn.readLoop): the slow read is there, not in the handler.
type httpCaller struct {
	url    string
	client *http.Client
}

func (h *httpCaller) call(ctx context.Context, traceID string) (conn, error) {
	var info conn
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
		info = conn{port(i.Conn.LocalAddr()), port(i.Conn.RemoteAddr()), monoNs()}
	}})
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.url, nil)
	if err != nil {
		return info, err
	}
	req.Header.Set("x-trace-id", traceID)
	resp, err := h.client.Do(req)
	if err != nil {
		return info, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("downstream status %d", resp.StatusCode)
	}
	return info, err
}

func runAPI(log *truth) {
	a := &api{log: log}
	switch {
	case strings.HasPrefix(*downstream, "tcp:"):
		a.kind, a.down = "tcp", &tcpCaller{addr: strings.TrimPrefix(*downstream, "tcp:"),
			idle: make(chan *lineConn, 256)}
	case strings.HasPrefix(*downstream, "http://"):
		a.kind, a.down = "http", &httpCaller{url: *downstream, client: &http.Client{
			Transport: &http.Transport{MaxIdleConnsPerHost: 256, IdleConnTimeout: time.Minute}}}
	default:
		fail(2, "-mode api needs -downstream tcp:HOST:PORT or http://HOST:PORT")
	}
	ln := listen(log)
	fail(1, http.Serve(ln, http.HandlerFunc(a.handle)))
}

// ---- the downstreams ----

// runTCPDownstream answers each line "ping X" with "pong X", -delay after it came.
func runTCPDownstream(log *truth) {
	ln := listen(log)
	for {
		c, err := ln.Accept()
		if err != nil {
			fail(1, err)
		}
		go func(c net.Conn) {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				time.Sleep(*delay)
				if _, err := io.WriteString(c, "pong "+strings.TrimPrefix(line, "ping ")); err != nil {
					return
				}
			}
		}(c)
	}
}

func runHTTPDownstream(log *truth) {
	ln := listen(log)
	fail(1, http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(*delay)
		io.WriteString(w, "pong "+r.Header.Get("x-trace-id")+"\n")
	})))
}

// ---- the client ----

func runClient(log *truth) {
	if *target == "" || *conns <= 0 || *thinkMax < *thinkMin {
		fail(2, "-mode client needs -target URL, -conns > 0 and -think-max >= -think-min")
	}
	deadline := time.Now().Add(*duration)
	var mu sync.Mutex
	requests, errs := 0, 0
	var wg sync.WaitGroup
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			rng := mrand.New(mrand.NewSource(*seed + int64(i)))
			// a Transport of its own: one keep-alive connection per client
			c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			defer c.CloseIdleConnections()
			for time.Now().Before(deadline) {
				var lport int
				ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
					GotConn: func(i httptrace.GotConnInfo) { lport = port(i.Conn.LocalAddr()) }})
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, *target, nil)
				traceID, spanID := "", ""
				if *sendTrace {
					traceID, spanID = newID(16), newID(8)
					req.Header.Set("traceparent", "00-"+traceID+"-"+spanID+"-01")
				}
				start := monoNs()
				resp, err := c.Do(req)
				var apiTrace, apiSpan string
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
					apiTrace, apiSpan, _ = parseTraceparent(resp.Header.Get("traceparent"))
				}
				log.record(map[string]any{"kind": "request", "trace_id": traceID,
					"span_id": spanID, "api_trace_id": apiTrace, "api_span_id": apiSpan,
					"local_port": lport, "start_ns": start, "end_ns": monoNs(), "err": errText(err)})
				mu.Lock()
				requests++
				if err != nil {
					errs++
				}
				mu.Unlock()
				think := *thinkMin + time.Duration(rng.Int63n(int64(*thinkMax-*thinkMin)+1))
				time.Sleep(think)
			}
		}(i)
	}
	wg.Wait()
	log.flush()
	summary, _ := json.Marshal(map[string]any{"target": *target, "requests": requests, "errors": errs})
	fmt.Println(string(summary))
	if errs > 0 {
		os.Exit(1)
	}
}

// ---- plumbing: the clock, the truth log, listening ----

// CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns) in ns. Go's time.Time keeps a monotonic
// reading but hides its base, so find the base once: read clock_gettime between two
// time.Now() calls, keep the tightest pair of 20, and add time.Since(that moment) later on.
var (
	monoAt   time.Time
	monoAtNs int64
)

func calibrateClock() {
	bestGap := time.Hour
	for i := 0; i < 20; i++ {
		before := time.Now()
		var ts syscall.Timespec
		syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
		after := time.Now()
		if gap := after.Sub(before); gap < bestGap {
			bestGap = gap
			monoAt, monoAtNs = before.Add(gap/2), ts.Nano()
		}
	}
}

func monoNs() int64 { return monoAtNs + int64(time.Since(monoAt)) }

// goid is the current goroutine's id, for the truth only (parsed from "goroutine N [...").
func goid() int64 {
	var b [32]byte
	s := strings.TrimPrefix(string(b[:runtime.Stack(b[:], false)]), "goroutine ")
	n, _ := strconv.ParseInt(s[:strings.IndexByte(s, ' ')], 10, 64)
	return n
}

// truth is the ground-truth log: one JSON object per line, flushed every second and at exit.
type truth struct {
	mu sync.Mutex
	w  *bufio.Writer // nil: no -truth
}

func openTruth() *truth {
	t := &truth{}
	if *truthPath != "" {
		f, err := os.Create(*truthPath)
		if err != nil {
			fail(1, err)
		}
		t.w = bufio.NewWriter(f)
		go func() {
			for range time.Tick(time.Second) {
				t.flush()
			}
		}()
	}
	return t
}

func (t *truth) record(v map[string]any) {
	if t.w == nil {
		return
	}
	b, _ := json.Marshal(v)
	t.mu.Lock()
	t.w.Write(append(b, '\n'))
	t.mu.Unlock()
}

func (t *truth) flush() {
	t.mu.Lock()
	if t.w != nil {
		t.w.Flush()
	}
	t.mu.Unlock()
}

// listen opens the server's port, says where on stdout, and exits 0 on SIGTERM/SIGINT after
// flushing the truth.
func listen(log *truth) net.Listener {
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fail(1, err)
	}
	hello, _ := json.Marshal(map[string]any{"listening": ln.Addr().String(), "pid": os.Getpid()})
	fmt.Println(string(hello))
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		log.flush()
		os.Exit(0)
	}()
	return ln
}

func port(a net.Addr) int {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.Port
	}
	return 0
}

func errText(err error) any {
	if err == nil {
		return nil
	}
	return err.Error()
}

// fail prints what went wrong and exits with code.
func fail(code int, what any) {
	fmt.Fprintln(os.Stderr, "tracedapi:", what)
	os.Exit(code)
}

func main() {
	flag.Parse()
	calibrateClock()
	log := openTruth()
	switch *mode {
	case "api":
		runAPI(log)
	case "client":
		runClient(log)
	case "tcp-downstream":
		runTCPDownstream(log)
	case "http-downstream":
		runHTTPDownstream(log)
	default:
		fail(2, "-mode must be api, client, tcp-downstream or http-downstream")
	}
}
