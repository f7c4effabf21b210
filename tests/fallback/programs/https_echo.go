// https_echo: the real upstream of the proxy tests.  An HTTPS server (HTTP/1.1 and,
// through ALPN, HTTP/2) that answers every request with what it saw of it: protocol,
// the peer address (so a test can tell the server saw the real client), the SNI, the
// client certificate's subject, and the request body.
//
//	https_echo -listen :443 -cert server.crt -key server.key [-client-ca ca.crt]
//
// With -client-ca it requires and verifies a client certificate (mutual TLS).
// Prints "ready" once listening; serves until killed.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
)

func main() {
	listen := flag.String("listen", ":443", "address to listen on")
	certFile := flag.String("cert", "", "server certificate (PEM)")
	keyFile := flag.String("key", "", "server key (PEM)")
	clientCA := flag.String("client-ca", "", "require client certificates signed by this CA")
	flag.Parse()

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	config := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
	if *clientCA != "" {
		pem, err := os.ReadFile(*clientCA)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		config.ClientCAs = pool
		config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		client := "-"
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			client = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		sni := "-"
		if r.TLS != nil && r.TLS.ServerName != "" {
			sni = r.TLS.ServerName
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "proto=%s remote=%s sni=%s client=%s path=%s body=%s\n",
			r.Proto, r.RemoteAddr, sni, client, r.URL.Path, body)
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	server := &http.Server{Handler: handler, TLSConfig: config}
	fmt.Println("ready")
	if err := server.ServeTLS(ln, "", ""); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
