// Command httpchain is a chain of HTTP services, with ground truth: clients -> api -> downstream.
// One binary, the mode by flag; standard library only:
//
//	httpchain -mode downstream -addr 127.0.0.1:0 -delay 50ms
//	httpchain -mode api -addr 127.0.0.1:0 -downstream http://127.0.0.1:PORT/
//	httpchain -mode client -target http://127.0.0.1:PORT/api -conns 4 -think-max 150ms -duration 5s
//
// The modes:
//   - downstream: a net/http server whose handler sleeps -delay, then answers -size bytes.
//   - api: a net/http server (keep-alive) whose handler /api calls the downstream with one
//     shared net/http.Client (keep-alive, one Transport), reads its answer and replies. Its
//     variants: -burn D busy-loops D per request and -spin N starts N goroutines spinning
//     forever (a CPU-starved service, under a CPU quota or GOMAXPROCS=1); -lag D sleeps after
//     the downstream's response headers came and before reading its body, so the body (make
//     it larger than the Transport's 4 KiB read buffer with the downstream's -size) stands
//     in the kernel's receive queue (a slow consumer). The body is read with Reads of
//     -readbuf bytes: the default, 256 KiB, drains what stood in the queue in one Read, so
//     one lagging call is one slow read (io.Copy's 8 KiB Reads would make a slow read of
//     every 8 KiB, and otelwater records at most 50 such reads a socket a second).
//   - client: -conns keep-alive clients (one connection each), each doing GET -target, then
//     thinking a uniformly random time in [-think-min, -think-max], until -duration is over.
//
// The servers print {"listening": "127.0.0.1:PORT", "pid": N} as their first line on stdout;
// the client prints a JSON summary at the end. SIGTERM/SIGINT flush the truth and exit 0.
//
// Ground truth, one JSON line per event in -truth FILE (stdout when empty, after the first
// line), times on CLOCK_MONOTONIC ns (the clock of bpf_ktime_get_ns):
//
//	downstream, per request (its sleep measured by itself: the delay the api's read waits for):
//	  {"kind":"downstream","local_port":L,"remote_port":R,"start_ns":..,"slept_ns":..,"end_ns":..,"bytes":N}
//	api, per downstream call (local_port: the api's end of the connection to the downstream;
//	client_port: the client's end of the connection the request came on):
//	  {"kind":"call","local_port":L,"remote_port":R,"client_port":C,"reused":true,
//	   "start_ns":..,"wrote_ns":..,"first_byte_ns":..,"headers_ns":..,"read_body_ns":..,
//	   "body_ns":..,"end_ns":..,"latency_ns":first_byte-wrote,"bytes":N,"err":null}
//	client, per request (sent_ns: its write to the socket returned; think_ns: the pause after it):
//	  {"kind":"request","local_port":L,"start_ns":..,"sent_ns":..,"end_ns":..,"think_ns":..,"err":null}
//
// wrote_ns is taken when the Transport has written the request into its buffer, just before
// it flushes it to the socket; first_byte_ns when the response's first byte is in hand;
// headers_ns when client.Do returned; read_body_ns when the handler starts reading the body
// (after -lag); body_ns when it has read all of it.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

var (
	mode       = flag.String("mode", "", "downstream, api or client (required)")
	addr       = flag.String("addr", "127.0.0.1:0", "listen address (downstream, api)")
	delay      = flag.Duration("delay", 50*time.Millisecond, "downstream: sleep per request before answering")
	size       = flag.Int("size", 64, "downstream: response body bytes")
	downstream = flag.String("downstream", "", "api: URL of the downstream (required)")
	burn       = flag.Duration("burn", 0, "api: busy-loop this long per request (CPU burn)")
	spin       = flag.Int("spin", 0, "api: goroutines spinning on the CPU forever (a starved runtime)")
	lag        = flag.Duration("lag", 0, "api: sleep after the downstream's headers, before reading its body")
	readBuf    = flag.Int("readbuf", 256<<10, "api: bytes asked of each Read of the downstream's body")
	maxIdle    = flag.Int("max-idle", 256, "api: idle keep-alive connections kept to the downstream")
	target     = flag.String("target", "", "client: URL to GET (required)")
	conns      = flag.Int("conns", 4, "client: concurrent keep-alive clients")
	thinkMin   = flag.Duration("think-min", 0, "client: least think time after each request")
	thinkMax   = flag.Duration("think-max", 150*time.Millisecond, "client: most think time after each request")
	duration   = flag.Duration("duration", 5*time.Second, "client: how long to run")
	seed       = flag.Int64("seed", 1, "client: random seed of the think times")
	truthPath  = flag.String("truth", "", "JSON Lines file of the ground truth; empty = stdout")
)

// Monotonic time, as slowreader and loadgen take it: Go's runtime clock is CLOCK_MONOTONIC
// (vDSO), but time.Time hides its base. Calibrate once against clock_gettime(CLOCK_MONOTONIC)
// so each later reading is a cheap time.Since plus a fixed offset, comparable with
// bpf_ktime_get_ns.
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

// truth is the ground-truth log: one JSON object per line, flushed every second, at exit and
// on SIGTERM (so a test that stops a server reads all of it).
type truth struct {
	mu sync.Mutex
	w  *bufio.Writer
	f  *os.File
}

func openTruth() *truth {
	t := &truth{f: os.Stdout}
	if *truthPath != "" {
		f, err := os.Create(*truthPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "httpchain:", err)
			os.Exit(1)
		}
		t.f = f
	}
	t.w = bufio.NewWriterSize(t.f, 1<<16)
	go func() {
		for range time.Tick(time.Second) {
			t.flush()
		}
	}()
	return t
}

func (t *truth) record(v map[string]any) {
	b, _ := json.Marshal(v)
	t.mu.Lock()
	t.w.Write(append(b, '\n'))
	t.mu.Unlock()
}

func (t *truth) flush() {
	t.mu.Lock()
	t.w.Flush()
	t.mu.Unlock()
}

func errText(err error) any {
	if err == nil {
		return nil
	}
	return err.Error()
}

func port(a net.Addr) int {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.Port
	}
	return 0
}

func remotePort(r *http.Request) int {
	_, p, _ := net.SplitHostPort(r.RemoteAddr)
	n, _ := strconv.Atoi(p)
	return n
}

func localPort(r *http.Request) int {
	if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		return port(a)
	}
	return 0
}

// spins counts the spinners' and burners' loops (a global, so the loops are real work).
var spins [64]uint64

//go:noinline
func spinner(i int) {
	for {
		spins[i%len(spins)]++
	}
}

//go:noinline
func burnFor(d time.Duration) {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		for i := 0; i < 1000; i++ {
			spins[63]++
		}
	}
}

// serve listens, says where, and serves h until SIGTERM/SIGINT.
func serve(h http.Handler, log *truth) {
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "httpchain:", err)
		os.Exit(1)
	}
	hello, _ := json.Marshal(map[string]any{"listening": ln.Addr().String(), "pid": os.Getpid()})
	os.Stdout.Write(append(hello, '\n'))
	srv := &http.Server{Handler: h}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		log.flush()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "httpchain:", err)
		os.Exit(1)
	}
	log.flush()
}

func runDownstream(log *truth) {
	body := make([]byte, *size)
	for i := range body {
		body[i] = byte('a' + i%26)
	}
	serve(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := monoNs()
		time.Sleep(*delay)
		slept := monoNs() - start
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		log.record(map[string]any{"kind": "downstream", "local_port": localPort(r),
			"remote_port": remotePort(r), "start_ns": start, "slept_ns": slept,
			"end_ns": monoNs(), "bytes": len(body)})
	}), log)
}

func runAPI(log *truth) {
	for i := 0; i < *spin; i++ {
		go spinner(i)
	}
	// one Transport for every request, keeping enough idle connections that concurrent
	// requests reuse theirs (the default, 2 a host, would close and redial the others)
	client := &http.Client{Transport: &http.Transport{
		MaxIdleConns: *maxIdle, MaxIdleConnsPerHost: *maxIdle, IdleConnTimeout: time.Minute,
		DisableCompression: true,
	}}
	reply := []byte("ok\n")
	bufs := sync.Pool{New: func() any { b := make([]byte, *readBuf); return &b }}
	mux := http.NewServeMux()
	mux.HandleFunc("/api", func(w http.ResponseWriter, r *http.Request) {
		start := monoNs()
		if *burn > 0 {
			burnFor(*burn)
		}
		// the Transport's goroutines call these (its writeLoop, its readLoop): atomics
		var lport, rport, wrote, firstByte int64
		var reused int32
		trace := &httptrace.ClientTrace{
			GotConn: func(i httptrace.GotConnInfo) {
				atomic.StoreInt64(&lport, int64(port(i.Conn.LocalAddr())))
				atomic.StoreInt64(&rport, int64(port(i.Conn.RemoteAddr())))
				if i.Reused {
					atomic.StoreInt32(&reused, 1)
				}
			},
			WroteRequest:         func(httptrace.WroteRequestInfo) { atomic.StoreInt64(&wrote, monoNs()) },
			GotFirstResponseByte: func() { atomic.StoreInt64(&firstByte, monoNs()) },
		}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(r.Context(), trace),
			http.MethodGet, *downstream, nil)
		var n int64
		var headers, readBody, bodyDone int64
		bp := bufs.Get().(*[]byte)
		defer bufs.Put(bp)
		buf := *bp
		resp, err := client.Do(req)
		headers = monoNs()
		if err == nil {
			if *lag > 0 {
				time.Sleep(*lag)
			}
			readBody = monoNs()
			n, err = drain(resp.Body, buf)
			resp.Body.Close()
			bodyDone = monoNs()
		}
		if err != nil {
			w.WriteHeader(http.StatusBadGateway)
		}
		w.Write(reply)
		wr, fb := atomic.LoadInt64(&wrote), atomic.LoadInt64(&firstByte)
		log.record(map[string]any{"kind": "call", "local_port": atomic.LoadInt64(&lport),
			"remote_port": atomic.LoadInt64(&rport), "client_port": remotePort(r),
			"reused": atomic.LoadInt32(&reused) == 1, "start_ns": start, "wrote_ns": wr,
			"first_byte_ns": fb, "headers_ns": headers, "read_body_ns": readBody, "body_ns": bodyDone, "end_ns": monoNs(),
			"latency_ns": fb - wr, "bytes": n, "err": errText(err)})
	})
	serve(mux, log)
}

// drain reads r to its end with Reads of len(buf) bytes; the bytes read.
func drain(r io.Reader, buf []byte) (int64, error) {
	var n int64
	for {
		m, err := r.Read(buf)
		n += int64(m)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// sentConn stamps when each Write (the Transport's of a request) returned: the request was on
// its way then, however long the client took between start_ns and sending it.
type sentConn struct {
	net.Conn
	sent *int64 // atomic
}

func (c *sentConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	atomic.StoreInt64(c.sent, monoNs())
	return n, err
}

type clientResult struct {
	requests, errors int
	latencies        []time.Duration
}

func runClient(log *truth) {
	if *thinkMax < *thinkMin {
		fmt.Fprintln(os.Stderr, "httpchain: -think-max must be >= -think-min")
		os.Exit(2)
	}
	results := make([]clientResult, *conns)
	var wg sync.WaitGroup
	deadline := time.Now().Add(*duration)
	for i := range results {
		wg.Add(1)
		go func(i int, res *clientResult) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(*seed + int64(i)))
			var lport, sent int64
			// its own Transport: one keep-alive connection per client, stamping its sends
			var d net.Dialer
			c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1,
				DisableCompression: true, IdleConnTimeout: time.Minute,
				DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
					nc, err := d.DialContext(ctx, network, address)
					if err != nil {
						return nil, err
					}
					return &sentConn{Conn: nc, sent: &sent}, nil
				}}}
			defer c.CloseIdleConnections()
			trace := &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
				atomic.StoreInt64(&lport, int64(port(ci.Conn.LocalAddr())))
			}}
			ctx := httptrace.WithClientTrace(context.Background(), trace)
			for time.Now().Before(deadline) {
				start := monoNs()
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, *target, nil)
				resp, err := c.Do(req)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				end := monoNs()
				think := *thinkMin
				if span := *thinkMax - *thinkMin; span > 0 {
					think += time.Duration(rng.Int63n(int64(span) + 1))
				}
				log.record(map[string]any{"kind": "request", "local_port": atomic.LoadInt64(&lport),
					"start_ns": start, "sent_ns": atomic.LoadInt64(&sent), "end_ns": end,
					"think_ns": int64(think), "err": errText(err)})
				res.requests++
				res.latencies = append(res.latencies, time.Duration(end-start))
				if err != nil {
					res.errors++
					time.Sleep(10 * time.Millisecond) // a failing target: do not spin
				}
				time.Sleep(think)
			}
		}(i, &results[i])
	}
	wg.Wait()
	log.flush()
	var reqs, errs int
	var sum time.Duration
	for _, r := range results {
		reqs, errs = reqs+r.requests, errs+r.errors
		for _, l := range r.latencies {
			sum += l
		}
	}
	mean := 0.0
	if reqs > 0 {
		mean = float64(sum.Microseconds()) / float64(reqs) / 1e3
	}
	summary, _ := json.Marshal(map[string]any{"target": *target, "conns": *conns,
		"requests": reqs, "errors": errs, "mean_ms": mean})
	if *truthPath == "" { // the truth went to stdout: keep it one stream of lines
		log.record(map[string]any{"kind": "summary", "requests": reqs, "errors": errs, "mean_ms": mean})
		log.flush()
	} else {
		os.Stdout.Write(append(summary, '\n'))
	}
	if errs > 0 {
		os.Exit(1)
	}
}

func main() {
	flag.Parse()
	calibrate()
	switch *mode {
	case "downstream":
		runDownstream(openTruth())
	case "api":
		if *downstream == "" || *readBuf <= 0 {
			fmt.Fprintln(os.Stderr, "httpchain: -mode api needs -downstream URL and -readbuf > 0")
			os.Exit(2)
		}
		runAPI(openTruth())
	case "client":
		if *target == "" || *conns <= 0 {
			fmt.Fprintln(os.Stderr, "httpchain: -mode client needs -target URL and -conns > 0")
			os.Exit(2)
		}
		runClient(openTruth())
	default:
		fmt.Fprintln(os.Stderr, "httpchain: -mode must be downstream, api or client")
		os.Exit(2)
	}
}
