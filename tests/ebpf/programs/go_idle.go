// go_idle: more idle keep-alive TLS connections than the agent's old call map held.
//
//	go_idle -conns N
//
// One process, both ends in Go's crypto/tls: an HTTPS server (HTTP/1.1 only) and a
// client that opens N connections to it.  Prints {"pid":..} and waits for a line on
// stdin (the test starts the agent meanwhile).  Round 1 makes one request per
// connection, all N in flight at once (the handler holds every answer until all N
// arrived), so N distinct connections exist; then every connection is idle, and each
// one has two (*tls.Conn).Read calls blocked in it: the server waiting for the next
// request, the client transport's read loop waiting for the next response.  That is
// 2N calls the agent must remember at once.  It prints {"idle":N} and waits for a
// second line; then round 2 makes one more request on every connection.  Each path
// is /r/<i>/<round>, each body "round <round> conn <i>".  Last line: a JSON summary.
package main

import (
	"bufio"
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
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func main() {
	conns := flag.Int("conns", 8400, "connections")
	flag.Parse()
	n := *conns

	// Two fds per connection in this one process.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	var arrived int64
	allArrived := make(chan struct{})
	var round1 sync.Once
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var i, round int
			fmt.Sscanf(r.URL.Path, "/r/%d/%d", &i, &round)
			if round == 1 {
				if atomic.AddInt64(&arrived, 1) == int64(n) {
					round1.Do(func() { close(allArrived) })
				}
				select {
				case <-allArrived:
				case <-time.After(120 * time.Second):
				}
			}
			fmt.Fprintf(w, "round %d conn %d", round, i)
		}),
		// HTTP/1.1 only: HTTP/2 would multiplex every request on one connection.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		IdleTimeout:  10 * time.Minute,
	}
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{selfSigned()}}
	go srv.ServeTLS(ln, "", "")

	// Dials and handshakes a few hundred at a time (the accept backlog is finite);
	// requests wait in the handler, not here.
	dials := make(chan struct{}, 256)
	tr := &http.Transport{
		MaxIdleConns:        n,
		MaxIdleConnsPerHost: n,
		IdleConnTimeout:     10 * time.Minute,
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials <- struct{}{}
			defer func() { <-dials }()
			raw, err := net.Dial(network, addr)
			if err != nil {
				return nil, err
			}
			c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, ServerName: "localhost"})
			if err := c.HandshakeContext(ctx); err != nil {
				raw.Close()
				return nil, err
			}
			return c, nil
		},
	}
	client := &http.Client{Transport: tr, Timeout: 180 * time.Second}
	url := fmt.Sprintf("https://%s", ln.Addr())

	stdin := bufio.NewReader(os.Stdin)
	out, _ := json.Marshal(map[string]int{"pid": os.Getpid()})
	fmt.Println(string(out))
	stdin.ReadString('\n')

	round := func(r int) (ok int64, failed int64, firstErr string) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				resp, err := client.Get(fmt.Sprintf("%s/r/%d/%d", url, i, r))
				if err == nil {
					var body []byte
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && string(body) != fmt.Sprintf("round %d conn %d", r, i) {
						err = fmt.Errorf("unexpected body %q", body)
					}
				}
				if err != nil {
					atomic.AddInt64(&failed, 1)
					mu.Lock()
					if firstErr == "" {
						firstErr = err.Error()
					}
					mu.Unlock()
					return
				}
				atomic.AddInt64(&ok, 1)
			}(i)
		}
		wg.Wait()
		return
	}

	start := time.Now()
	ok1, failed1, err1 := round(1)
	out, _ = json.Marshal(map[string]any{"idle": ok1, "failed": failed1, "error": err1,
		"seconds": time.Since(start).Seconds()})
	fmt.Println(string(out))
	stdin.ReadString('\n')
	ok2, failed2, err2 := round(2)
	out, _ = json.Marshal(map[string]any{"round1": ok1, "round2": ok2, "failed": failed1 + failed2,
		"error": err1 + err2})
	fmt.Println(string(out))
}
