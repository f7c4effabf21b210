// go_tls_write_loop: time crypto/tls.(*Conn).Write over a loopback TLS 1.3 connection.
//
// The Go twin of ssl_write_loop.c, with the same flags, the same stdin/stdout
// protocol and the same JSON result, so bench/benchlib.py's start_loadgen /
// LoadgenRun drive either one.  The per-call latency is reported under
// "tls_write" (ssl_write_loop.c: "ssl_write").
//
// One process: a TLS server goroutine on 127.0.0.1 (self-signed P-256
// certificate made at start-up) and a client that calls (*tls.Conn).Write in a
// loop, timing each call with time.Now.
//
// The server completes its handshake with crypto/tls and then drains the
// *raw* TCP connection, with SO_RCVLOWAT at 256 KiB: it never decrypts, so it
// never calls (*Conn).Read, so no Read probe (tlscap attaches one) fires in
// this process besides the client's Write ones, and it wakes once per 256 KiB
// rather than once per record (ssl_write_loop.c explains why that matters).
//
// --wait-stdin: print "READY <pid>" after the handshake and wait for a line on
// stdin before the timed loop, so a tracer can be attached to this very pid.
//
// --duration S [--rate R]: write for S seconds, paced to R calls/s (0 = flat
// out), and report the rate instead of per-call latencies.
//
// --procs N: GOMAXPROCS.  With one P the server goroutine runs only when the
// writer blocks or is preempted, never beside it on the other CPU: the median
// Write then stays within ~0.1 µs from run to run, where with two Ps it jumps
// between ~1.2 and ~2.1 µs (on this 2-CPU VM).
//
// Build: go build -o go_tls_write_loop go_tls_write_loop.go  (Go >= 1.18)
package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"runtime"
	"sort"
	"syscall"
	"time"
)

const pattern = "tlscap-bench-payload "

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "go_tls_write_loop: "+format+"\n", a...)
	os.Exit(1)
}

func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		die("key generation: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		die("certificate: %v", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// serve accepts one connection, does the TLS handshake, then throws the
// ciphertext away unread by crypto/tls (see the file comment).
func serve(ln net.Listener, done chan<- error) {
	raw, err := ln.Accept()
	ln.Close()
	if err != nil {
		done <- fmt.Errorf("accept: %w", err)
		return
	}
	defer raw.Close()
	config := &tls.Config{
		Certificates: []tls.Certificate{selfSigned()},
		MinVersion:   tls.VersionTLS13,
	}
	if err := tls.Server(raw, config).Handshake(); err != nil {
		done <- fmt.Errorf("server handshake: %w", err)
		return
	}
	if sc, ok := raw.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVLOWAT, 256<<10)
			})
		}
	}
	buf := make([]byte, 1<<16)
	for {
		if _, err := raw.Read(buf); err != nil {
			if err == io.EOF {
				err = nil
			}
			done <- err // the deferred Close ends the client's last Read
			return
		}
	}
}

type latency struct {
	MeanNs   float64 `json:"mean_ns"`
	MedianNs float64 `json:"median_ns"`
	MinNs    int64   `json:"min_ns"`
	P10Ns    int64   `json:"p10_ns"`
	P90Ns    int64   `json:"p90_ns"`
	P99Ns    int64   `json:"p99_ns"`
	MaxNs    int64   `json:"max_ns"`
}

func summarize(t []int64) *latency {
	sort.Slice(t, func(i, j int) bool { return t[i] < t[j] })
	n := len(t)
	var sum float64
	for _, x := range t {
		sum += float64(x)
	}
	median := float64(t[n/2])
	if n%2 == 0 {
		median = (float64(t[n/2-1]) + float64(t[n/2])) / 2
	}
	return &latency{
		MeanNs: sum / float64(n), MedianNs: median, MinNs: t[0], P10Ns: t[n/10],
		P90Ns: t[n*9/10], P99Ns: t[n*99/100], MaxNs: t[n-1],
	}
}

// The same keys as ssl_write_loop.c's result line, plus the Go version.
type result struct {
	Pid          int      `json:"pid"`
	ServerPid    int      `json:"server_pid"`
	Size         int      `json:"size"`
	Calls        int64    `json:"calls"`
	TimedCalls   int64    `json:"timed_calls"`
	BytesWritten int64    `json:"bytes_written"`
	Seconds      float64  `json:"seconds"`
	CallsPerS    float64  `json:"calls_per_s"`
	MBPerS       float64  `json:"mb_per_s"`
	Echo         bool     `json:"echo"`
	GoVersion    string   `json:"go_version"`
	GoMaxProcs   int      `json:"gomaxprocs"`
	TLSWrite     *latency `json:"tls_write,omitempty"`
}

func main() {
	count := flag.Int("count", 20000, "timed Write calls (latency mode)")
	warmup := flag.Int("warmup", 1000, "untimed Write calls before them")
	size := flag.Int("size", 4096, "bytes per Write")
	duration := flag.Float64("duration", 0, ">0: rate mode, write for this many seconds")
	rate := flag.Float64("rate", 0, "rate mode: target calls/s (0 = flat out)")
	waitStdin := flag.Bool("wait-stdin", false, `print "READY <pid>" and wait for a stdin line`)
	procs := flag.Int("procs", 0, "GOMAXPROCS (0: Go's default, one per CPU)")
	flag.Parse()
	if *count < 1 || *warmup < 0 || *size < 1 || *size > 1<<24 || *rate < 0 || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if *procs > 0 {
		runtime.GOMAXPROCS(*procs)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		die("listen: %v", err)
	}
	served := make(chan error, 1)
	go serve(ln, served)

	raw, err := net.Dial("tcp", ln.Addr().String()) // Go sets TCP_NODELAY itself
	if err != nil {
		die("connect: %v", err)
	}
	// Our own self-signed server: nothing to verify.
	conn := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	if err := conn.Handshake(); err != nil {
		die("client handshake: %v", err)
	}

	msg := make([]byte, *size)
	for i := range msg {
		msg[i] = pattern[i%len(pattern)]
	}

	if *waitStdin {
		fmt.Printf("READY %d\n", os.Getpid())
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			die("stdin closed before go")
		}
	}

	write := func() {
		if n, err := conn.Write(msg); n != len(msg) || err != nil {
			die("Write: %d of %d bytes: %v", n, len(msg), err)
		}
	}
	var calls int64
	var times []int64
	var start, end time.Time
	if *duration > 0 {
		start = time.Now()
		stop := start.Add(time.Duration(*duration * 1e9))
		var gap time.Duration
		if *rate > 0 {
			gap = time.Duration(1e9 / *rate)
		}
		for {
			t := time.Now()
			if !t.Before(stop) {
				break
			}
			if gap > 0 {
				// Due times are absolute, so a late wake-up is caught up, not carried on.
				if due := start.Add(time.Duration(calls) * gap); due.Sub(t) > 20*time.Microsecond {
					time.Sleep(due.Sub(t))
				}
			}
			write()
			calls++
		}
		end = time.Now()
	} else {
		times = make([]int64, *count) // allocated up front: no GC work from the timing itself
		for i := 0; i < *warmup+*count; i++ {
			if i == *warmup {
				start = time.Now()
			}
			t0 := time.Now()
			write()
			d := time.Since(t0)
			if i >= *warmup {
				times[i-*warmup] = int64(d)
			}
			calls++
		}
		end = time.Now()
	}

	// A clean end: close_notify and a half-close, then read until the server, having
	// drained everything, closes its end.  This untimed Read (it returns no data)
	// also keeps (*Conn).Read linked into the binary: tlscap's Go binary analysis
	// wants both Write and Read, as every real TLS program has them.
	if err := conn.CloseWrite(); err != nil { // sends close_notify only
		die("CloseWrite: %v", err)
	}
	if err := raw.(*net.TCPConn).CloseWrite(); err != nil {
		die("TCP CloseWrite: %v", err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, _ := conn.Read(make([]byte, 64)); n != 0 {
		die("Read: the server sent %d bytes of data", n)
	}
	conn.Close()
	if err := <-served; err != nil {
		die("server: %v", err)
	}

	secs := end.Sub(start).Seconds()
	timed := int64(*count)
	if *duration > 0 {
		timed = calls
	}
	r := result{
		Pid: os.Getpid(), ServerPid: os.Getpid(), Size: *size, Calls: calls, TimedCalls: timed,
		BytesWritten: calls * int64(*size), Seconds: secs, GoVersion: runtime.Version(),
		GoMaxProcs: runtime.GOMAXPROCS(0),
	}
	if secs > 0 {
		r.CallsPerS = float64(timed) / secs
		r.MBPerS = float64(timed) * float64(*size) / secs / 1e6
	}
	if times != nil {
		r.TLSWrite = summarize(times)
	}
	out, err := json.Marshal(r)
	if err != nil {
		die("json: %v", err)
	}
	fmt.Println(string(out))
}
