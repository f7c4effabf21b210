// go_https: a Go HTTPS server and client for the Go TLS capture tests.
//
// Both sides use crypto/tls through net/http (HTTP/1.1) and record, per TCP
// connection, every plaintext byte they hand to or get from tls.Conn: the ground
// truth the captured records are compared with.  The recording wrapper calls
// tls.Conn.Write/Read with the very buffers net/http passes, so what the probes
// see and what is recorded are the same calls.
//
//	go_https server -record DIR               prints {"port":N,"pid":P}, serves until stdin closes
//	go_https client -port N -record DIR -workers W -requests R -size S [-hold] [-pause D] [-wrap-tcp]
//	    W goroutines, each with its own keep-alive connection, each doing R POSTs of
//	    S bytes that the server echoes; prints {"pid":P,"requests":N,...}.  With -hold
//	    every worker does one request, prints {"held":true} and waits for a line on
//	    stdin before doing the rest.
//
// Recorded files: DIR/<role>-<localport>-<remoteport>.sent and .recv.
package main

import (
	"bufio"
	"bytes"
	"context"
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
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

type recordingConn struct {
	*tls.Conn
	mu         sync.Mutex
	sent, recv *os.File
}

func newRecordingConn(c *tls.Conn, dir, role string) (*recordingConn, error) {
	local := c.LocalAddr().(*net.TCPAddr)
	remote := c.RemoteAddr().(*net.TCPAddr)
	base := filepath.Join(dir, fmt.Sprintf("%s-%d-%d", role, local.Port, remote.Port))
	sent, err := os.Create(base + ".sent")
	if err != nil {
		return nil, err
	}
	recv, err := os.Create(base + ".recv")
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c, sent: sent, recv: recv}, nil
}

func (c *recordingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.mu.Lock()
	c.sent.Write(b[:n])
	c.mu.Unlock()
	return n, err
}

func (c *recordingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.mu.Lock()
		c.recv.Write(b[:n])
		c.mu.Unlock()
	}
	return n, err
}

func (c *recordingConn) Close() error {
	err := c.Conn.Close()
	c.mu.Lock()
	c.sent.Close()
	c.recv.Close()
	c.mu.Unlock()
	return err
}

// opaqueConn hides the *net.TCPConn behind another type, as connection wrappers
// (metrics, proxies, test doubles) do.
type opaqueConn struct{ net.Conn }

type recordingListener struct {
	net.Listener
	config *tls.Config
	dir    string
}

func (l *recordingListener) Accept() (net.Conn, error) {
	raw, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newRecordingConn(tls.Server(raw, l.config), l.dir, "server")
}

func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	must(err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func echo(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("X-Request-Id", r.Header.Get("X-Request-Id"))
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

func serve(args []string) {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	dir := fs.String("record", "", "directory for the recorded plaintext")
	fs.Parse(args)
	inner, err := net.Listen("tcp", *addr)
	must(err)
	config := &tls.Config{Certificates: []tls.Certificate{selfSigned()}}
	ln := &recordingListener{Listener: inner, config: config, dir: *dir}
	srv := &http.Server{Handler: http.HandlerFunc(echo)}
	go srv.Serve(ln)
	emit(map[string]any{"port": inner.Addr().(*net.TCPAddr).Port, "pid": os.Getpid()})
	io.Copy(io.Discard, os.Stdin) // until the test closes stdin
	srv.Shutdown(context.Background())
}

func body(worker, request, size int) []byte {
	var b bytes.Buffer
	line := fmt.Sprintf("worker %d request %d\n", worker, request)
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.Bytes()[:size]
}

func client(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	port := fs.Int("port", 0, "server port on 127.0.0.1")
	dir := fs.String("record", "", "directory for the recorded plaintext")
	workers := fs.Int("workers", 1, "goroutines, one connection each")
	requests := fs.Int("requests", 1, "requests per worker")
	size := fs.Int("size", 1024, "request (and echoed response) body bytes")
	hold := fs.Bool("hold", false, "after each worker's first request, wait for a stdin line")
	pause := fs.Duration("pause", 0, "sleep between a worker's requests")
	wrapTCP := fs.Bool("wrap-tcp", false, "hand tls.Client a net.Conn that is not a *net.TCPConn")
	fs.Parse(args)

	config := &tls.Config{InsecureSkipVerify: true}
	url := fmt.Sprintf("https://127.0.0.1:%d/echo", *port)
	var first, done sync.WaitGroup
	release := make(chan struct{})
	var mu sync.Mutex
	failures := 0
	fail := func(format string, a ...any) {
		mu.Lock()
		failures++
		mu.Unlock()
		fmt.Fprintf(os.Stderr, format+"\n", a...)
	}
	for w := 0; w < *workers; w++ {
		first.Add(1)
		done.Add(1)
		go func(w int) {
			defer done.Done()
			transport := &http.Transport{
				// Returning our wrapper (not a *tls.Conn) keeps the client on HTTP/1.1.
				DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
					raw, err := (&net.Dialer{}).DialContext(ctx, network, addr)
					if err != nil {
						return nil, err
					}
					if *wrapTCP {
						raw = opaqueConn{raw}
					}
					tc := tls.Client(raw, config)
					if err := tc.HandshakeContext(ctx); err != nil {
						return nil, err
					}
					return newRecordingConn(tc, *dir, "client")
				},
				MaxIdleConnsPerHost: 1,
				// One connection per worker, exactly: without a bound the transport may
				// dial a spare while the last response's connection is still on its way
				// back to the idle pool (CI once recorded 251 connections for 250
				// workers, the extra one carrying no request).
				MaxConnsPerHost: 1,
			}
			defer transport.CloseIdleConnections()
			hc := &http.Client{Transport: transport, Timeout: 120 * time.Second}
			for r := 0; r < *requests; r++ {
				if r == 1 {
					first.Done()
					if *hold {
						<-release
					}
				}
				if r > 0 && *pause > 0 {
					time.Sleep(*pause)
				}
				want := body(w, r, *size)
				req, err := http.NewRequest("POST", url, bytes.NewReader(want))
				must(err)
				id := fmt.Sprintf("%d-%d", w, r)
				req.Header.Set("X-Request-Id", id)
				resp, err := hc.Do(req)
				if err != nil {
					fail("worker %d request %d: %v", w, r, err)
					continue
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || !bytes.Equal(got, want) || resp.Header.Get("X-Request-Id") != id {
					fail("worker %d request %d: corrupted response (%d bytes, err %v)", w, r, len(got), err)
				}
			}
			if *requests <= 1 {
				first.Done()
			}
		}(w)
	}
	if *hold {
		first.Wait()
		emit(map[string]any{"held": true, "pid": os.Getpid()})
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(release)
	}
	done.Wait()
	emit(map[string]any{"pid": os.Getpid(), "requests": *workers * *requests, "failures": failures})
	if failures > 0 {
		os.Exit(1)
	}
}

func emit(v any) {
	b, err := json.Marshal(v)
	must(err)
	os.Stdout.Write(append(b, '\n'))
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: go_https server|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "server":
		serve(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", os.Args[1])
		os.Exit(2)
	}
}
