// Command gopeer is the Go interop peer for the backchannel project: a small program in
// the style of Gitaly's internal/grpc/backchannel + listenmux (hashicorp/yamux, grpc-go),
// built only from Debian's Go packages in GOPATH mode (see ../build.sh).
//
//	gopeer server [--listen ADDR] [--name NAME] [--window 16MiB] [--authority slash|percent]
//	gopeer client --server ADDR [--name NAME] [--window 256KiB] [--run SCENARIOS] [--hold]
//	gopeer plain  --server ADDR [--run SCENARIOS]
//
// Client scenarios (--run, comma-separated): forward-unary, forward-stream, callback-unary,
// callback-stream, bench-upload:<bytes>:<chunk>, bench-download:<bytes>:<chunk>,
// reverse-bench:<bytes>:<chunk>, sidechannel:<up>:<down>, sidechannel-unknown,
// sidechannel-noflush, sidechannel-framing, sidechannel-badpkt, sleep:<ms> (see client.go and sidechannel.go).
//
// The server prints "LISTENING <host:port>"; clients print one "OK|FAIL <scenario> ..." line
// per scenario and exit 0 only if all passed. Logs go to stderr. Every role exits on
// SIGINT/SIGTERM, and also when stdin is a pipe or socket and reaches EOF (so a dead test
// harness does not leak it; with stdin on /dev/null or a tty this watch is off).
package main

import (
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
)

var logger = log.New(os.Stderr, "", log.Ltime|log.Lmicroseconds)

func logf(format string, args ...interface{}) { logger.Printf(format, args...) }

var stopCh = make(chan struct{})

func stopSignal() <-chan struct{} { return stopCh }

func watchStop() {
	var once = make(chan struct{}, 1)
	stop := func(why string) {
		select {
		case once <- struct{}{}:
			logf("stopping: %s", why)
			close(stopCh)
		default:
		}
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() { s := <-sigs; stop(s.String()) }()
	if fi, err := os.Stdin.Stat(); err == nil && fi.Mode()&(os.ModeNamedPipe|os.ModeSocket) != 0 {
		go func() { io.Copy(ioutil.Discard, os.Stdin); stop("stdin closed") }()
	}
}

// parseSize accepts 16MiB, 256KiB, 1GiB, or a plain byte count.
func parseSize(s string) (uint32, error) {
	mult := uint64(1)
	for _, suf := range []struct {
		s string
		m uint64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}} {
		if strings.HasSuffix(s, suf.s) {
			mult, s = suf.m, strings.TrimSuffix(s, suf.s)
			break
		}
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil || v*mult > 1<<31 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	if v*mult < 256<<10 {
		return 0, fmt.Errorf("window %d below yamux minimum 256KiB", v*mult)
	}
	return uint32(v * mult), nil
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: gopeer server|client|plain [flags]  (gopeer ROLE -h for flags)")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	role, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet("gopeer "+role, flag.ExitOnError)
	watchStop()
	switch role {
	case "server":
		listen := fs.String("listen", "127.0.0.1:0", "listen address")
		name := fs.String("name", "go-server", "name returned in EchoResponse.server")
		window := fs.String("window", "16MiB", "yamux max stream window")
		authority := fs.String("authority", "slash", "reverse channel :authority form: slash (multiplexed/ADDR) or percent (multiplexed%2FADDR)")
		fs.Parse(args)
		w, err := parseSize(*window)
		if err != nil {
			logger.Fatal(err)
		}
		if *authority != "slash" && *authority != "percent" {
			logger.Fatalf("--authority must be slash or percent")
		}
		if err := runServer(*listen, *name, w, *authority); err != nil {
			logger.Fatal(err)
		}
	case "client", "plain":
		server := fs.String("server", "", "server address host:port")
		run := fs.String("run", "", "comma-separated scenarios")
		var name, window *string
		var hold *bool
		if role == "client" {
			name = fs.String("name", "go-client", "name returned in EchoResponse.server")
			window = fs.String("window", "256KiB", "yamux max stream window")
			hold = fs.Bool("hold", false, "stay connected after the scenarios until stdin closes (or a signal)")
		}
		fs.Parse(args)
		if *server == "" {
			logger.Fatal("--server is required")
		}
		var scen []string
		for _, s := range strings.Split(*run, ",") {
			if s = strings.TrimSpace(s); s != "" {
				scen = append(scen, s)
			}
		}
		var ok bool
		var err error
		if role == "client" {
			w, perr := parseSize(*window)
			if perr != nil {
				logger.Fatal(perr)
			}
			ok, err = runClient(*server, *name, w, scen, *hold)
		} else {
			ok, err = runPlain(*server, scen)
		}
		if err != nil {
			logger.Fatal(err)
		}
		if !ok {
			os.Exit(1)
		}
	default:
		usage()
	}
}
