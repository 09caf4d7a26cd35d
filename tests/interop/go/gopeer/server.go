package main

// Server role: a listenmux-style listener (peek 11 bytes; "backchannel" => yamux server
// session whose stream 1 goes to the gRPC server, anything else => plain gRPC with the
// peeked bytes replayed), a peer registry, and per-peer reverse gRPC channels that open a
// new yamux stream per dial.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

const magic = "backchannel"

// ---------- peer registry ----------

type peerEntry struct {
	id      uint64
	remote  string
	session *yamux.Session
	cc      *grpc.ClientConn // reverse channel; dials lazily, one new yamux stream per dial
	once    sync.Once
}

type registry struct {
	mu     sync.Mutex
	nextID uint64
	peers  map[uint64]*peerEntry
}

func newRegistry() *registry { return &registry{peers: map[uint64]*peerEntry{}} }

func (r *registry) add(p *peerEntry) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nextID++
	p.id = r.nextID
	r.peers[p.id] = p
	return p.id
}

func (r *registry) get(id uint64) (*peerEntry, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.peers[id]
	if !ok {
		return nil, fmt.Errorf("no backchannel for peer %d", id)
	}
	return p, nil
}

// remove is idempotent: it unregisters the peer, closes its reverse channel and session.
func (r *registry) remove(p *peerEntry, why string) {
	p.once.Do(func() {
		r.mu.Lock()
		delete(r.peers, p.id)
		r.mu.Unlock()
		p.cc.Close()
		p.session.Close()
		logf("peer %d disconnected (%s) remote=%s", p.id, why, p.remote)
	})
}

// ---------- connections handed to grpc.Server ----------

// peerConn is yamux stream 1 of a multiplexed peer. Closing it (gRPC server drops the
// transport) tears the whole session down, like Gitaly.
type peerConn struct {
	net.Conn
	peer *peerEntry
	reg  *registry
}

func (c *peerConn) Close() error {
	err := c.Conn.Close()
	c.reg.remove(c.peer, "transport closed")
	return err
}

// replayConn is a plain connection whose peeked bytes are read again first.
type replayConn struct {
	net.Conn
	prefix []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// ---------- peer identity through the gRPC credentials handshake ----------

// peerAuthInfo is what peer.FromContext(ctx).AuthInfo holds for a multiplexed caller.
type peerAuthInfo struct {
	credentials.CommonAuthInfo
	id uint64
}

func (peerAuthInfo) AuthType() string { return "backchannel" }

type plainAuthInfo struct{ credentials.CommonAuthInfo }

func (plainAuthInfo) AuthType() string { return "insecure" }

// peerCreds is a server-only TransportCredentials doing no crypto: it only tags each
// connection with the peer ID of its yamux session (or marks it plain).
type peerCreds struct{}

func (peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	common := credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}
	if pc, ok := c.(*peerConn); ok {
		return c, peerAuthInfo{CommonAuthInfo: common, id: pc.peer.id}, nil
	}
	return c, plainAuthInfo{CommonAuthInfo: common}, nil
}

func (peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peerCreds is server-only")
}
func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}
func (peerCreds) Clone() credentials.TransportCredentials { return peerCreds{} }
func (peerCreds) OverrideServerName(string) error         { return nil }

var errNonMultiplexed = status.Error(codes.FailedPrecondition, "non-multiplexed connection")

func peerIDFrom(ctx context.Context) (uint64, error) {
	if p, ok := peer.FromContext(ctx); ok {
		if ai, ok := p.AuthInfo.(peerAuthInfo); ok {
			return ai.id, nil
		}
	}
	return 0, errNonMultiplexed
}

// ---------- the multiplexing listener ----------

type muxListener struct {
	inner       net.Listener
	reg         *registry
	yamuxConfig *yamux.Config
	authority   string // "slash" or "percent"
	peekTimeout time.Duration
	conns       chan net.Conn
	done        chan struct{}
	closeOnce   sync.Once
}

func (l *muxListener) run() {
	for {
		c, err := l.inner.Accept()
		if err != nil {
			select {
			case <-l.done:
				return
			default:
			}
			if ne, ok := err.(net.Error); ok && ne.Temporary() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			logf("accept: %v", err)
			l.Close()
			return
		}
		go l.handshake(c) // a silent client never blocks the accept loop
	}
}

func (l *muxListener) deliver(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *muxListener) handshake(c net.Conn) {
	buf := make([]byte, len(magic))
	c.SetReadDeadline(time.Now().Add(l.peekTimeout))
	n, err := io.ReadFull(c, buf)
	c.SetReadDeadline(time.Time{})
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		logf("peek from %s: %v", c.RemoteAddr(), err)
		c.Close()
		return
	}
	if n < len(magic) || string(buf) != magic {
		l.deliver(&replayConn{Conn: c, prefix: buf[:n]})
		return
	}

	session, err := yamux.Server(c, l.yamuxConfig)
	if err != nil {
		logf("yamux server: %v", err)
		c.Close()
		return
	}
	// Accept exactly one client-opened stream (stream 1): the client's gRPC connection.
	timer := time.AfterFunc(l.peekTimeout, func() { session.Close() })
	stream, err := session.Accept()
	timer.Stop()
	if err != nil {
		logf("yamux accept stream 1 from %s: %v", c.RemoteAddr(), err)
		session.Close()
		return
	}

	remote := c.RemoteAddr().String()
	p := &peerEntry{remote: remote, session: session}
	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return session.Open() // a new yamux stream (2, 4, 6, ...) per (re)connect
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize), grpc.MaxCallSendMsgSize(maxMsgSize)),
	}
	// grpc-go 1.33 (Debian 12) uses the dial target as :authority verbatim: no escaping.
	// "percent" forces the form newer grpc-go (1.57+) puts on the wire.
	if l.authority == "percent" {
		opts = append(opts, grpc.WithAuthority("multiplexed%2F"+remote))
	}
	cc, err := grpc.Dial("multiplexed/"+remote, opts...)
	if err != nil {
		logf("reverse dial: %v", err)
		session.Close()
		return
	}
	p.cc = cc
	id := l.reg.add(p)
	logf("peer %d connected remote=%s", id, remote)
	go func() {
		<-session.CloseChan()
		l.reg.remove(p, "session closed")
	}()
	l.deliver(&peerConn{Conn: stream, peer: p, reg: l.reg})
}

func (l *muxListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, errors.New("listener closed")
	}
}

func (l *muxListener) Close() error {
	l.closeOnce.Do(func() {
		close(l.done)
		l.inner.Close()
	})
	return nil
}

func (l *muxListener) Addr() net.Addr { return l.inner.Addr() }

// ---------- Callback service + reverse bench ----------

type callbackServer struct{ reg *registry }

// backchannel returns the reverse channel of the calling peer or, when the call carries
// metadata "target-peer: <id>", of that peer: the way a test (or an operator, with a plain
// client) makes the server call a peer on its own, e.g. an agent that never calls it.
func (s *callbackServer) backchannel(ctx context.Context) (uint64, *grpc.ClientConn, error) {
	id, err := peerIDFrom(ctx)
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get("target-peer")) > 0 {
		var target uint64
		if _, perr := fmt.Sscanf(md.Get("target-peer")[0], "%d", &target); perr != nil {
			return 0, nil, status.Errorf(codes.InvalidArgument, "bad target-peer: %v", perr)
		}
		id, err = target, nil
	}
	if err != nil {
		return 0, nil, err
	}
	p, err := s.reg.get(id)
	if err != nil {
		return 0, nil, status.Error(codes.Unavailable, err.Error())
	}
	return id, p.cc, nil
}

func registerCallback(srv *grpc.Server, s *callbackServer) {
	srv.RegisterService(&grpc.ServiceDesc{
		ServiceName: callbackService,
		HandlerType: anyHandler,
		Methods: []grpc.MethodDesc{{
			MethodName: "CallMeBack",
			Handler: func(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				req := &CallMeBackRequest{}
				if err := dec(req); err != nil {
					return nil, err
				}
				id, cc, err := s.backchannel(ctx)
				if err != nil {
					return nil, err
				}
				reply, err := callEchoUnary(ctx, cc, req.Message)
				if err != nil {
					return nil, err
				}
				return &CallMeBackResponse{PeerID: id, Reply: reply}, nil
			},
		}},
		Streams: []grpc.StreamDesc{{
			StreamName: "StreamMeBack", ServerStreams: true,
			Handler: func(_ interface{}, st grpc.ServerStream) error {
				req := &CallMeBackRequest{}
				if err := st.RecvMsg(req); err != nil {
					return err
				}
				_, cc, err := s.backchannel(st.Context())
				if err != nil {
					return err
				}
				rs, err := openEchoServerStream(st.Context(), cc, req.Message, req.Count)
				if err != nil {
					return err
				}
				for {
					resp := &EchoResponse{}
					if err := rs.RecvMsg(resp); err == io.EOF {
						return nil
					} else if err != nil {
						return err
					}
					if err := st.SendMsg(resp); err != nil {
						return err
					}
				}
			},
		}},
	}, s)
}

func (s *callbackServer) reverseBench(ctx context.Context, total uint64, chunk int) (string, error) {
	id, cc, err := s.backchannel(ctx)
	if err != nil {
		return "", err
	}
	start := time.Now()
	if err := benchUpload(ctx, cc, total, chunk); err != nil {
		return "", status.Errorf(codes.Internal, "reverse upload to peer %d: %v", id, err)
	}
	up := time.Since(start)
	if err := benchDownload(ctx, cc, total, chunk); err != nil {
		return "", status.Errorf(codes.Internal, "reverse download from peer %d: %v", id, err)
	}
	all := time.Since(start)
	logf("reverse bench peer %d: %d bytes chunk %d: up %v (%.1f MB/s) down %v (%.1f MB/s)",
		id, total, chunk, up, mbps(total, up), all-up, mbps(total, all-up))
	return fmt.Sprintf("OK up=%d down=%d ms=%d", total, total, all.Milliseconds()), nil
}

// sidechannel serves Bench.Echo "SIDECHANNEL:<bytes>" on the calling peer's session.
func (s *callbackServer) sidechannel(ctx context.Context, spec string) (string, error) {
	id, err := peerIDFrom(ctx)
	if err != nil {
		return "", err
	}
	p, err := s.reg.get(id)
	if err != nil {
		return "", status.Error(codes.Unavailable, err.Error())
	}
	return serveSidechannel(ctx, p.session, spec)
}

// ---------- entry point ----------

func runServer(listen, name string, window uint32, authority string) error {
	inner, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	cfg := yamux.DefaultConfig()
	cfg.AcceptBacklog = 1
	cfg.MaxStreamWindowSize = window
	cfg.EnableKeepAlive = false
	cfg.LogOutput = ioutil.Discard
	// Debian's yamux (git 2019-09-23) predates Config.StreamCloseTimeout (5 min in Gitaly).

	reg := newRegistry()
	lis := &muxListener{
		inner: inner, reg: reg, yamuxConfig: cfg, authority: authority,
		peekTimeout: 10 * time.Second,
		conns:       make(chan net.Conn), done: make(chan struct{}),
	}
	go lis.run()

	cb := &callbackServer{reg: reg}
	srv := grpc.NewServer(grpc.Creds(peerCreds{}),
		grpc.MaxRecvMsgSize(maxMsgSize), grpc.MaxSendMsgSize(maxMsgSize))
	registerEcho(srv, &echoServer{name: name})
	registerBench(srv, &benchServer{reverse: cb.reverseBench, side: cb.sidechannel})
	registerCallback(srv, cb)

	fmt.Printf("LISTENING %s\n", inner.Addr().String())
	os.Stdout.Sync()
	logf("server %q window=%d authority=%s grpc-go=%s", name, window, authority, grpc.Version)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case <-stopSignal():
		logf("shutting down")
		lis.Close()
		srv.Stop()
		return nil
	case err := <-errc:
		return err
	}
}
