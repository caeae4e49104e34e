// Command etcd runs a single-member etcd 3.5 (go.etcd.io/etcd/server/v3/embed,
// the version k8s.io/kubernetes pins in go.mod) on loopback for the apiserver
// tests: plain HTTP client URL, no peers beyond itself, data in -data-dir.
// It prints "ready" on stdout once the member serves and exits on SIGTERM.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

func mustURL(s string) url.URL {
	u, err := url.Parse(s)
	if err != nil {
		log.Fatalf("etcd: bad URL %q: %v", s, err)
	}
	return *u
}

func main() {
	dataDir := flag.String("data-dir", "", "data directory (required)")
	client := flag.String("listen-client-url", "", "client URL, http://127.0.0.1:PORT (required)")
	peer := flag.String("listen-peer-url", "", "peer URL, http://127.0.0.1:PORT (required)")
	flag.Parse()
	if *dataDir == "" || *client == "" || *peer == "" {
		log.Fatal("etcd: -data-dir, -listen-client-url and -listen-peer-url are required")
	}
	cfg := embed.NewConfig()
	cfg.Name = "default"
	cfg.Dir = *dataDir
	cfg.LogLevel = "warn"
	c, p := mustURL(*client), mustURL(*peer)
	cfg.ListenClientUrls = []url.URL{c}
	cfg.AdvertiseClientUrls = []url.URL{c}
	cfg.ListenPeerUrls = []url.URL{p}
	cfg.AdvertisePeerUrls = []url.URL{p}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ListenMetricsUrls = nil
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd: start: %v", err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
		fmt.Println("ready")
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		log.Fatal("etcd: not ready within 60s")
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		log.Printf("etcd: %v, stopping", s)
	case err := <-e.Err():
		log.Fatalf("etcd: %v", err)
	}
}
