package main

// Client roles: "client" (magic + yamux client session; stream 1 carries our gRPC
// connection to the server; we serve Echo and Bench on server-opened streams) and
// "plain" (ordinary gRPC, no magic).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

func runClient(server, name string, window uint32, scenarios []string, hold bool) (bool, error) {
	conn, err := net.Dial("tcp", server)
	if err != nil {
		return false, err
	}
	if _, err := conn.Write([]byte(magic)); err != nil {
		return false, err
	}
	cfg := yamux.DefaultConfig()
	cfg.AcceptBacklog = 256
	cfg.MaxStreamWindowSize = window
	cfg.EnableKeepAlive = false
	cfg.LogOutput = ioutil.Discard
	session, err := yamux.Client(conn, cfg)
	if err != nil {
		return false, err
	}
	defer session.Close()
	stream1, err := session.Open()
	if err != nil {
		return false, err
	}
	var used int32
	cc, err := grpc.Dial("passthrough:///"+server,
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			// Stream 1 is the only client-opened stream the server accepts; never open another.
			if atomic.CompareAndSwapInt32(&used, 0, 1) {
				return stream1, nil
			}
			return nil, errors.New("backchannel: stream 1 already used; reconnect needs a new session")
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize), grpc.MaxCallSendMsgSize(maxMsgSize)))
	if err != nil {
		return false, err
	}
	defer cc.Close()

	// Our backchannel server: every stream the server opens is sniffed; sidechannels go
	// to their waiters, the others are HTTP/2 connections.
	waiters := newSideWaiters()
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(maxMsgSize), grpc.MaxSendMsgSize(maxMsgSize))
	registerEcho(srv, &echoServer{name: name})
	registerBench(srv, &benchServer{})
	go func() {
		err := srv.Serve(newSniffListener(session, waiters))
		logf("backchannel server stopped: %v", err)
	}()
	defer srv.Stop()
	logf("client %q connected to %s window=%d grpc-go=%s", name, server, window, grpc.Version)

	ok := runScenarios(cc, name, waiters, scenarios)
	if hold {
		logf("holding connection until stdin closes or a signal")
		select {
		case <-stopSignal():
		case <-session.CloseChan():
			logf("session closed by server")
		}
	}
	return ok, nil
}

func runPlain(server string, scenarios []string) (bool, error) {
	cc, err := grpc.Dial(server, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize), grpc.MaxCallSendMsgSize(maxMsgSize)))
	if err != nil {
		return false, err
	}
	defer cc.Close()
	return runScenarios(cc, "", nil, scenarios), nil
}

// runScenarios runs the scenarios in turn; waiters is nil for a plain (not multiplexed)
// client.
func runScenarios(cc *grpc.ClientConn, name string, waiters *sideWaiters, scenarios []string) bool {
	allOK := true
	for _, sc := range scenarios {
		select {
		case <-stopSignal():
			fmt.Printf("FAIL %s stopped\n", sc)
			return false
		default:
		}
		details, err := runScenario(cc, name, waiters, sc)
		if err != nil {
			allOK = false
			fmt.Printf("FAIL %s %s\n", sc, strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Printf("OK %s %s\n", sc, details)
		}
	}
	return allOK
}

func runScenario(cc *grpc.ClientConn, name string, waiters *sideWaiters, sc string) (string, error) {
	multiplexed := waiters != nil
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	kind, arg := sc, ""
	if i := strings.IndexByte(sc, ':'); i >= 0 {
		kind, arg = sc[:i], sc[i+1:]
	}
	switch kind {
	case "forward-unary":
		r, err := callEchoUnary(ctx, cc, "hello")
		if err != nil {
			return "", err
		}
		if r.Message != "hello" {
			return "", fmt.Errorf("message %q", r.Message)
		}
		return "server=" + r.Server, nil

	case "forward-stream":
		st, err := openEchoServerStream(ctx, cc, "s", 3)
		if err != nil {
			return "", err
		}
		var got []string
		var srvName string
		for {
			r := &EchoResponse{}
			if err := st.RecvMsg(r); err == io.EOF {
				break
			} else if err != nil {
				return "", err
			}
			got = append(got, r.Message)
			srvName = r.Server
		}
		if strings.Join(got, ",") != "s-0,s-1,s-2" {
			return "", fmt.Errorf("server stream got %q", got)
		}
		bidi, err := cc.NewStream(ctx, &grpc.StreamDesc{StreamName: "Bidi", ServerStreams: true, ClientStreams: true}, "/"+echoService+"/Bidi")
		if err != nil {
			return "", err
		}
		for i := 0; i < 3; i++ {
			m := fmt.Sprintf("b%d", i)
			if err := bidi.SendMsg(&EchoRequest{Message: m}); err != nil {
				return "", err
			}
			r := &EchoResponse{}
			if err := bidi.RecvMsg(r); err != nil {
				return "", err
			}
			if r.Message != m {
				return "", fmt.Errorf("bidi got %q want %q", r.Message, m)
			}
		}
		bidi.CloseSend()
		if err := bidi.RecvMsg(&EchoResponse{}); err != io.EOF {
			return "", fmt.Errorf("bidi end: %v", err)
		}
		return "server=" + srvName + " stream=3 bidi=3", nil

	case "callback-unary":
		resp := &CallMeBackResponse{}
		err := cc.Invoke(ctx, "/"+callbackService+"/CallMeBack", &CallMeBackRequest{Message: "ping"}, resp)
		if !multiplexed {
			if err == nil {
				return "", fmt.Errorf("plain caller got an answer (peer_id=%d), want FAILED_PRECONDITION", resp.PeerID)
			}
			if st, _ := status.FromError(err); st.Code().String() == "FailedPrecondition" {
				return "FAILED_PRECONDITION", nil
			}
			return "", err
		}
		if err != nil {
			return "", err
		}
		if resp.Reply == nil {
			return "", errors.New("no reply")
		}
		if resp.Reply.Server != name || resp.Reply.Message != "ping" {
			return "", fmt.Errorf("reply server=%q message=%q, want %q/ping", resp.Reply.Server, resp.Reply.Message, name)
		}
		return fmt.Sprintf("peer_id=%d server=%s message=%s", resp.PeerID, resp.Reply.Server, resp.Reply.Message), nil

	case "callback-stream":
		st, err := cc.NewStream(ctx, &grpc.StreamDesc{StreamName: "StreamMeBack", ServerStreams: true}, "/"+callbackService+"/StreamMeBack")
		if err != nil {
			return "", err
		}
		if err := st.SendMsg(&CallMeBackRequest{Message: "s", Count: 3}); err != nil {
			return "", err
		}
		st.CloseSend()
		var got []string
		for {
			r := &EchoResponse{}
			if err := st.RecvMsg(r); err == io.EOF {
				break
			} else if err != nil {
				return "", err
			}
			if r.Server != name {
				return "", fmt.Errorf("response from %q, want %q", r.Server, name)
			}
			got = append(got, r.Message)
		}
		if strings.Join(got, ",") != "s-0,s-1,s-2" {
			return "", fmt.Errorf("got %q", got)
		}
		return "server=" + name + " n=3", nil

	case "bench-upload", "bench-download":
		total, chunk, err := parseBenchSpec(arg)
		if err != nil {
			return "", err
		}
		start := time.Now()
		if kind == "bench-upload" {
			err = benchUpload(ctx, cc, total, chunk)
		} else {
			err = benchDownload(ctx, cc, total, chunk)
		}
		if err != nil {
			return "", err
		}
		d := time.Since(start)
		return fmt.Sprintf("bytes=%d chunk=%d ms=%d MB/s=%.1f", total, chunk, d.Milliseconds(), mbps(total, d)), nil

	case "reverse-bench":
		if _, _, err := parseBenchSpec(arg); err != nil {
			return "", err
		}
		start := time.Now()
		p := &Payload{}
		if err := cc.Invoke(ctx, "/"+benchService+"/Echo", &Payload{Data: []byte(reverseBenchPrefix + arg)}, p); err != nil {
			return "", err
		}
		reply := string(p.Data)
		if !strings.HasPrefix(reply, "OK ") {
			return "", fmt.Errorf("server replied %q", reply)
		}
		logf("reverse-bench %s: client wall time %v", arg, time.Since(start))
		return reply, nil // the server's reply verbatim: "OK up=<n> down=<n> ms=<elapsed>"

	case "sidechannel", "sidechannel-unknown", "sidechannel-noflush", "sidechannel-framing", "sidechannel-badpkt":
		if waiters == nil {
			return "", errors.New("sidechannels need a multiplexed client")
		}
		return runSidechannelScenario(ctx, cc, waiters, kind, arg)

	case "sleep":
		ms, err := strconv.Atoi(arg)
		if err != nil {
			return "", err
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-stopSignal():
		}
		return fmt.Sprintf("ms=%d", ms), nil
	}
	return "", fmt.Errorf("unknown scenario %q", sc)
}
