// Command slowreader is a TCP server whose reader can be made slow, with ground truth.
//
// Every conn.Read (through net.(*conn).Read, the function otelwater probes) is logged as one
// JSON line: goroutine id, fd, bytes requested and returned, start/end CLOCK_MONOTONIC ns (the
// clock of bpf_ktime_get_ns) and duration. The first line on stdout is
// {"listening": "127.0.0.1:PORT", "pid": N}. SIGTERM/SIGINT flush the log and exit 0.
//
//	slowreader -listen 127.0.0.1:9000 -delay 2ms -readsize 64 -mode echo -log reads.jsonl
//
// A starved runtime (data arrives on time, the reading goroutines cannot run): -burn N starts N
// goroutines that spin on the CPU forever; with GOMAXPROCS=1 in the environment they hold the
// only P, so a reader woken by its data waits for the scheduler (sysmon's netpoll and its
// 10 ms preemption):
//
//	GOMAXPROCS=1 slowreader -burn 2 -log reads.jsonl
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

var (
	listen   = flag.String("listen", "127.0.0.1:0", "listen address")
	delay    = flag.Duration("delay", 0, "sleep after each read (a slow consumer)")
	readSize = flag.Int("readsize", 4096, "bytes requested per Read")
	mode     = flag.String("mode", "echo", "echo (write back what was read) or sink (just read)")
	logPath  = flag.String("log", "", "JSON Lines file of every Read (ground truth); empty = none")
	burn     = flag.Int("burn", 0, "CPU-bound goroutines spinning forever (a starved runtime, with GOMAXPROCS=1)")
)

// spins counts the burners' loops (kept in a global so the loop is real work).
var spins [64]uint64

//go:noinline
func burner(i int) {
	for {
		spins[i%len(spins)]++
	}
}

// Monotonic time: Go's runtime clock is CLOCK_MONOTONIC (vDSO), but time.Time hides its base.
// Calibrate once against clock_gettime(CLOCK_MONOTONIC) so each later reading is a cheap
// time.Since plus a fixed offset, comparable with bpf_ktime_get_ns.
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

// readLog buffers the ground-truth records; flushed periodically, at exit and on SIGTERM.
type readLog struct {
	mu  sync.Mutex
	w   *bufio.Writer
	f   *os.File
	buf []byte
}

func (l *readLog) record(goid int64, fd int, local, remote string, requested, returned int, start, end int64, err error) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buf[:0]
	b = append(b, `{"goid":`...)
	b = strconv.AppendInt(b, goid, 10)
	b = append(b, `,"fd":`...)
	b = strconv.AppendInt(b, int64(fd), 10)
	b = append(b, `,"local":"`...)
	b = append(b, local...)
	b = append(b, `","remote":"`...)
	b = append(b, remote...)
	b = append(b, `","requested":`...)
	b = strconv.AppendInt(b, int64(requested), 10)
	b = append(b, `,"returned":`...)
	b = strconv.AppendInt(b, int64(returned), 10)
	b = append(b, `,"start_ns":`...)
	b = strconv.AppendInt(b, start, 10)
	b = append(b, `,"end_ns":`...)
	b = strconv.AppendInt(b, end, 10)
	b = append(b, `,"duration_ns":`...)
	b = strconv.AppendInt(b, end-start, 10)
	b = append(b, `,"err":`...)
	if err == nil {
		b = append(b, "null"...)
	} else {
		b = strconv.AppendQuote(b, err.Error())
	}
	b = append(b, "}\n"...)
	l.w.Write(b)
	l.buf = b
}

func (l *readLog) flush() {
	if l == nil {
		return
	}
	l.mu.Lock()
	l.w.Flush()
	l.mu.Unlock()
}

func goid() int64 {
	var b [64]byte
	s := b[:runtime.Stack(b[:], false)] // "goroutine 18 [running]:..."
	s = s[len("goroutine "):]
	n := 0
	for n < len(s) && s[n] >= '0' && s[n] <= '9' {
		n++
	}
	id, _ := strconv.ParseInt(string(s[:n]), 10, 64)
	return id
}

func connFD(c *net.TCPConn) int {
	fd := -1
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(f uintptr) { fd = int(f) })
	}
	return fd
}

// readOnce is the single Read call site; kept out of line so stacks name it.
//
//go:noinline
func readOnce(conn net.Conn, buf []byte) (int, error) {
	return conn.Read(buf)
}

//go:noinline
func handleConn(conn net.Conn, log *readLog) {
	defer conn.Close()
	id, fd := goid(), connFD(conn.(*net.TCPConn))
	local, remote := conn.LocalAddr().String(), conn.RemoteAddr().String()
	buf := make([]byte, *readSize)
	echo := *mode == "echo"
	for {
		start := monoNs()
		n, err := readOnce(conn, buf)
		end := monoNs()
		log.record(id, fd, local, remote, len(buf), n, start, end, err)
		if n > 0 && echo {
			if _, werr := conn.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				fmt.Fprintln(os.Stderr, "slowreader:", err)
			}
			return
		}
		if *delay > 0 {
			time.Sleep(*delay)
		}
	}
}

func main() {
	flag.Parse()
	if *mode != "echo" && *mode != "sink" {
		fmt.Fprintln(os.Stderr, "slowreader: -mode must be echo or sink")
		os.Exit(2)
	}
	if *burn < 0 {
		fmt.Fprintln(os.Stderr, "slowreader: -burn must be >= 0")
		os.Exit(2)
	}
	calibrate()
	var log *readLog
	if *logPath != "" {
		f, err := os.Create(*logPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "slowreader:", err)
			os.Exit(1)
		}
		log = &readLog{w: bufio.NewWriterSize(f, 1<<20), f: f, buf: make([]byte, 0, 256)}
		go func() {
			for range time.Tick(500 * time.Millisecond) {
				log.flush()
			}
		}()
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "slowreader:", err)
		os.Exit(1)
	}
	fmt.Printf("{\"listening\": %q, \"pid\": %d}\n", ln.Addr().String(), os.Getpid())
	for i := 0; i < *burn; i++ {
		go burner(i)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		log.flush()
		os.Exit(0)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "slowreader:", err)
			log.flush()
			os.Exit(1)
		}
		go handleConn(c, log)
	}
}
