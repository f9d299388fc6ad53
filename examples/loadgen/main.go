// Command loadgen drives slowreader: N connections doing ping-pong (write size bytes, read
// size bytes back) or a one-way stream, then prints a JSON summary on stdout.
//
//	loadgen -addr 127.0.0.1:9000 -conns 8 -size 64 -mode pingpong -count 1000
//	loadgen -addr 127.0.0.1:9000 -conns 1 -size 65536 -mode stream -duration 5s -pause 1ms
//
// With -log FILE, every message sent is one JSON line, the sender's ground truth (written at
// the end, so logging costs nothing while sending): the connection's local port, the message's
// sequence number on it (0, 1, ...), its bytes, and CLOCK_MONOTONIC ns (the clock of
// bpf_ktime_get_ns and of slowreader's log) just before the Write and just after it returned:
//
//	{"port":41234,"seq":0,"bytes":64,"send_ns":123,"done_ns":456}
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

var (
	addr     = flag.String("addr", "", "server address host:port (required)")
	conns    = flag.Int("conns", 1, "concurrent connections")
	size     = flag.Int("size", 64, "message bytes")
	mode     = flag.String("mode", "pingpong", "pingpong (write, read the echo) or stream (write only)")
	count    = flag.Int("count", 100, "messages per connection (ignored with -duration)")
	duration = flag.Duration("duration", 0, "send for this long instead of -count messages (writes block while a slow server lags)")
	pause    = flag.Duration("pause", 0, "sender pause between messages")
	logPath  = flag.String("log", "", "JSON Lines file of every message sent (ground truth); empty = none")
)

// Monotonic time, as slowreader takes it: Go's runtime clock is CLOCK_MONOTONIC (vDSO), but
// time.Time hides its base. Calibrate once against clock_gettime(CLOCK_MONOTONIC) so each later
// reading is a cheap time.Since plus a fixed offset, comparable with bpf_ktime_get_ns.
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

// sent is one message's ground truth (-log).
type sent struct{ sendNs, doneNs int64 }

type result struct {
	messages, sent, received int64
	rtts                     []time.Duration
	err                      error
	port                     int
	log                      []sent // with -log: every message, in order
}

func runConn(res *result) {
	c, err := net.Dial("tcp", *addr)
	if err != nil {
		res.err = err
		return
	}
	defer c.Close()
	res.port = c.LocalAddr().(*net.TCPAddr).Port
	logging := *logPath != ""
	msg := make([]byte, *size)
	for i := range msg {
		msg[i] = byte('a' + i%26)
	}
	back := make([]byte, *size)
	var drained sync.WaitGroup
	if *mode == "stream" { // discard whatever an echo server sends back
		drained.Add(1)
		go func() {
			defer drained.Done()
			n, _ := io.Copy(io.Discard, c)
			res.received = n
		}()
	}
	deadline := time.Now().Add(*duration)
	for i := 0; ; i++ {
		if *duration > 0 && !time.Now().Before(deadline) || *duration == 0 && i >= *count {
			break
		}
		t0 := time.Now()
		var s sent
		if logging {
			s.sendNs = monoNs()
		}
		if _, res.err = c.Write(msg); res.err != nil {
			return
		}
		if logging {
			s.doneNs = monoNs()
			res.log = append(res.log, s)
		}
		res.sent += int64(len(msg))
		if *mode == "pingpong" {
			if _, res.err = io.ReadFull(c, back); res.err != nil {
				return
			}
			res.received += int64(len(back))
			res.rtts = append(res.rtts, time.Since(t0))
		}
		res.messages++
		if *pause > 0 {
			time.Sleep(*pause)
		}
	}
	if *mode == "stream" {
		c.(*net.TCPConn).CloseWrite()
		drained.Wait()
	}
}

func pct(d []time.Duration, p float64) float64 {
	if len(d) == 0 {
		return 0
	}
	return float64(d[int(p*float64(len(d)-1))].Nanoseconds()) / 1e3
}

func writeLog(path string, results []result) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	b := make([]byte, 0, 128)
	for _, r := range results {
		for i, s := range r.log {
			b = append(b[:0], `{"port":`...)
			b = strconv.AppendInt(b, int64(r.port), 10)
			b = append(b, `,"seq":`...)
			b = strconv.AppendInt(b, int64(i), 10)
			b = append(b, `,"bytes":`...)
			b = strconv.AppendInt(b, int64(*size), 10)
			b = append(b, `,"send_ns":`...)
			b = strconv.AppendInt(b, s.sendNs, 10)
			b = append(b, `,"done_ns":`...)
			b = strconv.AppendInt(b, s.doneNs, 10)
			b = append(b, "}\n"...)
			w.Write(b)
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func main() {
	flag.Parse()
	if *addr == "" || (*mode != "pingpong" && *mode != "stream") || *size <= 0 || *conns <= 0 {
		fmt.Fprintln(os.Stderr, "loadgen: need -addr, -mode pingpong|stream, -size > 0, -conns > 0")
		os.Exit(2)
	}
	calibrate()
	results := make([]result, *conns)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range results {
		wg.Add(1)
		go func(r *result) { defer wg.Done(); runConn(r) }(&results[i])
	}
	wg.Wait()
	elapsed := time.Since(start)
	var msgs, sent, recv int64
	var rtts []time.Duration
	var errs []string
	for _, r := range results {
		msgs, sent, recv = msgs+r.messages, sent+r.sent, recv+r.received
		rtts = append(rtts, r.rtts...)
		if r.err != nil {
			errs = append(errs, r.err.Error())
		}
	}
	if *logPath != "" {
		if err := writeLog(*logPath, results); err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(1)
		}
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"addr": *addr, "mode": *mode, "conns": *conns, "size": *size,
		"messages": msgs, "bytes_sent": sent, "bytes_received": recv,
		"elapsed_s": elapsed.Seconds(), "msgs_per_s": float64(msgs) / elapsed.Seconds(),
		"rtt_us": map[string]float64{"p50": pct(rtts, 0.5), "p99": pct(rtts, 0.99), "max": pct(rtts, 1)},
		"errors": errs,
	})
	if len(errs) > 0 {
		os.Exit(1)
	}
}
