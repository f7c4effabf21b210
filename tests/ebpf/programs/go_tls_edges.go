// go_tls_edges: the rarer paths of crypto/tls.(*Conn).Write, for the capture tests.
//
// One process, a TLS server and client over loopback (no net/http), each
// recording what its Write calls returned: n and the bytes b[:n].
//
//	go_tls_edges tls10     TLS 1.0 with a CBC suite on both ends: every Write of
//	                       more than one byte is two writeRecordLocked calls (1/n-1
//	                       record splitting).  Both sides write; the client echoes.
//	go_tls_edges failwrite the server resets the connection after the first
//	                       message; the client writes until a Write fails, once
//	                       more (an early return: the connection's error is set),
//	                       then closes and writes again (net.ErrClosed).
//
// First prints {"pid":P} and waits for a line on stdin (the test waits until the
// agent has probed the binary).  Then prints one JSON line: pid, the ports, the negotiated version and suite, and per
// role the hex of all bytes its Writes reported written, in order.
package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"os"
	"time"
)

type writer struct {
	conn    *tls.Conn
	written []byte
	calls   []map[string]any
}

func (w *writer) write(b []byte) error {
	n, err := w.conn.Write(b)
	w.written = append(w.written, b[:n]...)
	call := map[string]any{"len": len(b), "n": n}
	if err != nil {
		call["err"] = err.Error()
	}
	w.calls = append(w.calls, call)
	return err
}

func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	must(err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func payload(size int, seed byte) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func main() {
	mode := os.Args[1]
	must(json.NewEncoder(os.Stdout).Encode(map[string]any{"pid": os.Getpid()}))
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		panic(err)
	}
	server := &tls.Config{Certificates: []tls.Certificate{selfSigned()}}
	client := &tls.Config{InsecureSkipVerify: true}
	if mode == "tls10" {
		suites := []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}
		for _, c := range []*tls.Config{server, client} {
			c.MinVersion, c.MaxVersion, c.CipherSuites = tls.VersionTLS10, tls.VersionTLS10, suites
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		raw, err := ln.Accept()
		must(err)
		accepted <- raw.(*net.TCPConn)
	}()
	craw, err := net.Dial("tcp", ln.Addr().String())
	must(err)
	sraw := <-accepted
	c := &writer{conn: tls.Client(craw, client)}
	s := &writer{conn: tls.Server(sraw, server)}
	done := make(chan error, 1)
	go func() { done <- s.conn.Handshake() }()
	must(c.conn.Handshake())
	must(<-done)
	state := c.conn.ConnectionState()
	out := map[string]any{
		"pid": os.Getpid(), "mode": mode,
		"client_port": craw.LocalAddr().(*net.TCPAddr).Port,
		"server_port": sraw.LocalAddr().(*net.TCPAddr).Port,
		"version": state.Version, "suite": tls.CipherSuiteName(state.CipherSuite),
	}
	switch mode {
	case "tls10":
		sizes := []int{1, 2, 100, 4096, 16384, 16385, 100000}
		total := 0
		for _, n := range sizes {
			total += n
		}
		go func() { // the server echoes what it reads, a Write per Read
			buf := make([]byte, 32768)
			for got := 0; got < total; {
				n, err := s.conn.Read(buf)
				must(err)
				got += n
				must(s.write(buf[:n]))
			}
			done <- nil
		}()
		for i, n := range sizes {
			must(c.write(payload(n, byte(i))))
		}
		_, err := io.ReadFull(c.conn, make([]byte, total))
		must(err)
		<-done
	case "failwrite":
		must(c.write(payload(3000, 1)))
		_, err := io.ReadFull(s.conn, make([]byte, 3000))
		must(err)
		must(sraw.SetLinger(0))
		must(sraw.Close()) // RST: the client's next writes fail
		failed := false
		for i := 0; i < 200 && !failed; i++ {
			failed = c.write(payload(4096, byte(i))) != nil
			time.Sleep(5 * time.Millisecond)
		}
		if !failed {
			panic("no Write failed after the peer's reset")
		}
		c.write(payload(500, 9)) // fails early: the connection's write error is set
		c.conn.Close()
		c.write(payload(600, 10)) // fails early: net.ErrClosed
	}
	out["client_written"] = hex.EncodeToString(c.written)
	out["server_written"] = hex.EncodeToString(s.written)
	out["client_calls"] = c.calls
	must(json.NewEncoder(os.Stdout).Encode(out))
}
