package main

// Sidechannels in the style of Gitaly's internal/grpc/sidechannel, written from the
// protocol alone:
//
//   - The client registers a waiter and gets a sequential int64 ID, and sends its call
//     with metadata "gitaly-sidechannel-id: <decimal>".
//   - The server's handler opens a new yamux stream on that client's session, writes the
//     11 bytes "sidechannel" and the ID as 8 bytes big-endian, and reads the 2 bytes "ok",
//     all within 5 s.
//   - The client sniffs every stream the server opens: "sidechannel" + ID goes to the
//     waiter (which answers "ok"; an unknown ID gets the stream closed), anything else is
//     HTTP/2 for its gRPC server.
//   - Client -> server bytes are pkt-lines (4 hex digits counting themselves, at most
//     65520 bytes a packet) ended by the flush packet "0000"; EOF without it is
//     io.ErrUnexpectedEOF. Server -> client bytes are raw, ended by the server's close.
//
// The data both sides exchange in the tests is the pseudo-random stream of
// backchannel_testkit::pattern::stream_slice (see streamSlice).

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	sidechannelMagic    = "sidechannel"
	sidechannelMetadata = "gitaly-sidechannel-id"
	sidechannelTimeout  = 5 * time.Second
	maxPktLen           = 65520
	sniffTimeout        = 10 * time.Second
)

// ---------- the test data: backchannel_testkit::pattern::stream_slice ----------

const (
	streamPeriod   = 65521
	streamMaxSlice = 1 << 20
)

// streamTable is a 65521-byte xorshift64* sequence (seed 0x9e3779b97f4a7c15, one byte
// per number: the low 8 bits of x * 0x2545f4914f6cdd1d), repeated to cover any slice of
// up to 1 MiB at any offset.
var streamTable = func() []byte {
	x := uint64(0x9e3779b97f4a7c15) | 1
	base := make([]byte, streamPeriod)
	for i := range base {
		x ^= x >> 12
		x ^= x << 25
		x ^= x >> 27
		base[i] = byte(x * 0x2545f4914f6cdd1d)
	}
	t := make([]byte, streamPeriod+streamMaxSlice)
	for i := range t {
		t[i] = base[i%streamPeriod]
	}
	return t
}()

// streamSlice returns the n (<= 1 MiB) bytes at offset of stream seed (do not modify).
func streamSlice(seed, offset uint64, n int) []byte {
	if n > streamMaxSlice {
		panic("streamSlice: at most 1 MiB")
	}
	start := int((offset + seed*7919) % streamPeriod)
	return streamTable[start : start+n]
}

// sendStream writes total bytes of stream seed to w.
func sendStream(w io.Writer, seed, total uint64) error {
	for off := uint64(0); off < total; {
		n := uint64(256 << 10)
		if rem := total - off; rem < n {
			n = rem
		}
		if _, err := w.Write(streamSlice(seed, off, int(n))); err != nil {
			return fmt.Errorf("write at offset %d: %w", off, err)
		}
		off += n
	}
	return nil
}

var errDataMismatch = errors.New("data mismatch")

// recvStream reads r to EOF, checking every byte against stream seed; returns the count.
func recvStream(r io.Reader, seed uint64) (uint64, error) {
	buf := make([]byte, 256<<10)
	var off uint64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			want := streamSlice(seed, off, n)
			for i := 0; i < n; i++ {
				if buf[i] != want[i] {
					return off, fmt.Errorf("%w: stream %d, wrong byte at offset %d", errDataMismatch, seed, off+uint64(i))
				}
			}
			off += uint64(n)
		}
		if err == io.EOF {
			return off, nil
		}
		if err != nil {
			return off, err
		}
	}
}

// ---------- pkt-line framing (client -> server) ----------

// pktWriter frames everything written to it as pkt-lines; CloseWrite sends the flush
// packet. Each packet's header and payload are separate writes, so a peer reads them in
// separate yamux frames (a 4-byte frame, then up to 65516 bytes).
type pktWriter struct {
	w      io.Writer
	closed bool
}

func newPktWriter(w io.Writer) *pktWriter { return &pktWriter{w: w} }

func (p *pktWriter) Write(b []byte) (int, error) {
	if p.closed {
		return 0, errors.New("sidechannel: write after the flush packet")
	}
	written := 0
	for len(b) > 0 {
		n := len(b)
		if n > maxPktLen-4 {
			n = maxPktLen - 4
		}
		if _, err := fmt.Fprintf(p.w, "%04x", n+4); err != nil {
			return written, err
		}
		if _, err := p.w.Write(b[:n]); err != nil {
			return written, err
		}
		written += n
		b = b[n:]
	}
	return written, nil
}

// CloseWrite sends the flush packet "0000": the server reads EOF.
func (p *pktWriter) CloseWrite() error {
	if p.closed {
		return nil
	}
	p.closed = true
	_, err := io.WriteString(p.w, "0000")
	return err
}

// pktReader unframes pkt-lines up to the flush packet, then returns io.EOF. A stream that
// ends before the flush packet is io.ErrUnexpectedEOF.
type pktReader struct {
	br      *bufio.Reader
	left    int // payload bytes left in the current packet
	flushed bool
}

func newPktReader(r io.Reader) *pktReader { return &pktReader{br: bufio.NewReaderSize(r, 256<<10)} }

func (p *pktReader) Read(b []byte) (int, error) {
	for {
		if p.flushed {
			return 0, io.EOF
		}
		if len(b) == 0 {
			return 0, nil
		}
		if p.left > 0 {
			if len(b) > p.left {
				b = b[:p.left]
			}
			n, err := p.br.Read(b)
			p.left -= n
			if err == io.EOF {
				if n > 0 {
					return n, nil // the next Read reports it
				}
				return 0, fmt.Errorf("sidechannel: the stream ended inside a packet: %w", io.ErrUnexpectedEOF)
			}
			return n, err
		}
		var hdr [4]byte
		if _, err := io.ReadFull(p.br, hdr[:]); err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return 0, fmt.Errorf("sidechannel: the stream ended without a flush packet: %w", io.ErrUnexpectedEOF)
			}
			return 0, err
		}
		for _, c := range hdr {
			if !strings.ContainsRune("0123456789abcdefABCDEF", rune(c)) {
				return 0, fmt.Errorf("sidechannel: invalid packet header %q", hdr[:])
			}
		}
		l, _ := strconv.ParseUint(string(hdr[:]), 16, 32)
		switch {
		case l == 0:
			p.flushed = true
		case l < 4:
			return 0, fmt.Errorf("sidechannel: invalid packet header %q", hdr[:])
		case l > maxPktLen:
			return 0, fmt.Errorf("sidechannel: packet of %d bytes, at most %d", l, maxPktLen)
		default:
			p.left = int(l) - 4
		}
	}
}

// ---------- the client side: waiters and the sniffing listener ----------

type sideWaiters struct {
	mu      sync.Mutex
	next    int64
	waiting map[int64]chan net.Conn
}

func newSideWaiters() *sideWaiters { return &sideWaiters{waiting: map[int64]chan net.Conn{}} }

// register returns a new ID and the channel its stream will arrive on.
func (w *sideWaiters) register() (int64, chan net.Conn) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.next++
	ch := make(chan net.Conn, 1)
	w.waiting[w.next] = ch
	return w.next, ch
}

func (w *sideWaiters) unregister(id int64) {
	w.mu.Lock()
	delete(w.waiting, id)
	w.mu.Unlock()
}

// deliver answers "ok" on a stream the server opened for sidechannel id and hands it to
// its waiter; a stream for an unknown ID is closed.
func (w *sideWaiters) deliver(id int64, c net.Conn) {
	w.mu.Lock()
	ch, ok := w.waiting[id]
	delete(w.waiting, id)
	w.mu.Unlock()
	if !ok {
		logf("sidechannel %d: no waiter; closing the stream", id)
		c.Close()
		return
	}
	c.SetWriteDeadline(time.Now().Add(sidechannelTimeout))
	if _, err := c.Write([]byte("ok")); err != nil {
		logf("sidechannel %d: answering ok: %v", id, err)
		c.Close()
		return
	}
	c.SetWriteDeadline(time.Time{})
	ch <- c
}

// sniffListener is the net.Listener the client's gRPC server accepts from: the streams
// the server opens, minus the sidechannels, their first bytes replayed.
type sniffListener struct {
	session *yamux.Session
	waiters *sideWaiters
	conns   chan net.Conn
	done    chan struct{}
	once    sync.Once
}

func newSniffListener(session *yamux.Session, waiters *sideWaiters) *sniffListener {
	l := &sniffListener{session: session, waiters: waiters, conns: make(chan net.Conn), done: make(chan struct{})}
	go l.run()
	return l
}

func (l *sniffListener) run() {
	for {
		c, err := l.session.Accept()
		if err != nil {
			l.Close()
			return
		}
		go l.sniff(c)
	}
}

func (l *sniffListener) sniff(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(sniffTimeout))
	buf := make([]byte, len(sidechannelMagic))
	have := 0
	// Read up to the magic's length, or to the first byte it does not start with.
	for have < len(buf) && strings.HasPrefix(sidechannelMagic, string(buf[:have])) {
		n, err := c.Read(buf[have:])
		have += n
		if err != nil {
			if have < len(buf) {
				logf("sniffing a stream: %v after %d bytes; closing it", err, have)
				c.Close()
				return
			}
			break
		}
	}
	if string(buf[:have]) == sidechannelMagic {
		var id [8]byte
		if _, err := io.ReadFull(c, id[:]); err != nil {
			logf("sidechannel: reading the ID: %v", err)
			c.Close()
			return
		}
		c.SetReadDeadline(time.Time{})
		l.waiters.deliver(int64(binary.BigEndian.Uint64(id[:])), c)
		return
	}
	c.SetReadDeadline(time.Time{})
	select {
	case l.conns <- &replayConn{Conn: c, prefix: buf[:have]}:
	case <-l.done:
		c.Close()
	}
}

func (l *sniffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, errors.New("listener closed")
	}
}

func (l *sniffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *sniffListener) Addr() net.Addr { return l.session.Addr() }

// sidechannelCall registers a waiter, runs call with the waiter's ID in the metadata and,
// once the server has opened the sidechannel, exchange on it (while the call runs).
// It returns the call's error, or exchange's if the call succeeded.
func sidechannelCall(ctx context.Context, waiters *sideWaiters, call func(context.Context) error, exchange func(net.Conn) error) error {
	id, ch := waiters.register()
	defer waiters.unregister(id)
	ctx = metadata.AppendToOutgoingContext(ctx, sidechannelMetadata, strconv.FormatInt(id, 10))
	callErr := make(chan error, 1)
	go func() { callErr <- call(ctx) }()
	select {
	case c := <-ch:
		err := exchange(c)
		c.Close()
		if cerr := <-callErr; cerr != nil {
			return cerr
		}
		return err
	case err := <-callErr:
		if err == nil {
			return errors.New("the call succeeded without opening its sidechannel")
		}
		return err
	}
}

// ---------- client scenarios against a server whose Bench.Echo opens the sidechannel ----------

// runSidechannelScenario runs the client side of "sidechannel:<up>:<down>",
// "sidechannel-unknown", "sidechannel-noflush", "sidechannel-framing" and
// "sidechannel-badpkt". The server's Bench.Echo takes the
// number of bytes to send back as its decimal payload and answers the number of bytes it
// received (checked as stream 1); the client sends stream 1 and checks stream 2.
func runSidechannelScenario(ctx context.Context, cc *grpc.ClientConn, waiters *sideWaiters, kind, arg string) (string, error) {
	echo := func(ctx context.Context, data string, reply *Payload) error {
		return cc.Invoke(ctx, "/"+benchService+"/Echo", &Payload{Data: []byte(data)}, reply)
	}
	switch kind {
	case "sidechannel":
		up, down, err := parseUpDown(arg)
		if err != nil {
			return "", err
		}
		reply := &Payload{}
		var got uint64
		start := time.Now()
		err = sidechannelCall(ctx, waiters,
			func(ctx context.Context) error { return echo(ctx, strconv.FormatUint(down, 10), reply) },
			func(c net.Conn) error { return clientExchange(c, up, down, &got) })
		if err != nil {
			return "", err
		}
		d := time.Since(start)
		if string(reply.Data) != strconv.FormatUint(up, 10) {
			return "", fmt.Errorf("server says it got %q bytes, we sent %d", reply.Data, up)
		}
		return fmt.Sprintf("up=%d down=%d ms=%d MB/s=%.1f", up, got, d.Milliseconds(), mbps(up+got, d)), nil

	case "sidechannel-unknown":
		// The call names an ID we never registered: the server's open must be refused
		// (we close the stream) and its handler fail.
		ctx = metadata.AppendToOutgoingContext(ctx, sidechannelMetadata, "987654")
		err := echo(ctx, "0", &Payload{})
		if err == nil {
			return "", errors.New("the call succeeded with an unknown sidechannel ID")
		}
		st, _ := status.FromError(err)
		return fmt.Sprintf("code=%s msg=%q", st.Code(), st.Message()), nil

	case "sidechannel-framing", "sidechannel-badpkt":
		// Hand-made pkt-lines, one write (one yamux frame) each. framing: a header split
		// across two frames, an empty packet "0004", an upper-case header, then the flush
		// packet: the server must read the 12 payload bytes. badpkt: "0001" (a pkt-line
		// delimiter, not data): the server must fail.
		p := streamSlice(1, 0, 12)
		parts := []string{"00", "0a", string(p[:6]), "0004", "000A", string(p[6:]), "0000"}
		if kind == "sidechannel-badpkt" {
			parts = []string{"0001"}
		}
		reply := &Payload{}
		err := sidechannelCall(ctx, waiters,
			func(ctx context.Context) error { return echo(ctx, "0", reply) },
			func(c net.Conn) error {
				for _, part := range parts {
					if _, err := io.WriteString(c, part); err != nil {
						return err
					}
				}
				_, err := io.Copy(io.Discard, c)
				return err
			})
		if kind == "sidechannel-badpkt" {
			if err == nil {
				return "", fmt.Errorf("the call succeeded (reply %q) although we sent 0001", reply.Data)
			}
			st, _ := status.FromError(err)
			return fmt.Sprintf("code=%s msg=%q", st.Code(), st.Message()), nil
		}
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("up=%s", reply.Data), nil

	case "sidechannel-noflush":
		// We send one packet and close the stream without the flush packet: the server's
		// reader must see an unexpected EOF and its handler fail.
		var got uint64
		err := sidechannelCall(ctx, waiters,
			func(ctx context.Context) error { return echo(ctx, "0", &Payload{}) },
			func(c net.Conn) error {
				w := newPktWriter(c)
				if _, err := w.Write(streamSlice(1, 0, 1000)); err != nil {
					return err
				}
				got = 1000
				return nil
			})
		if err == nil {
			return "", errors.New("the call succeeded although we never sent the flush packet")
		}
		if got != 1000 {
			return "", fmt.Errorf("the sidechannel failed before the call: %v", err)
		}
		st, _ := status.FromError(err)
		return fmt.Sprintf("code=%s msg=%q", st.Code(), st.Message()), nil
	}
	return "", fmt.Errorf("unknown scenario %q", kind)
}

func parseUpDown(s string) (uint64, uint64, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 2 {
		return 0, 0, fmt.Errorf("want <up>:<down>, got %q", s)
	}
	up, err := strconv.ParseUint(parts[0], 10, 64)
	if err != nil {
		return 0, 0, err
	}
	down, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil {
		return 0, 0, err
	}
	return up, down, nil
}

// clientExchange sends up bytes of stream 1 as pkt-lines and the flush packet while it
// reads raw stream 2 to EOF, checking every byte and the length.
func clientExchange(c net.Conn, up, down uint64, got *uint64) error {
	sent := make(chan error, 1)
	go func() {
		w := newPktWriter(c)
		if err := sendStream(w, 1, up); err != nil {
			sent <- err
			return
		}
		sent <- w.CloseWrite()
	}()
	n, rerr := recvStream(c, 2)
	*got = n
	if rerr != nil {
		c.Close() // unblocks the writer
		<-sent
		return fmt.Errorf("reading the server's bytes after %d: %w", n, rerr)
	}
	if err := <-sent; err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	if n != down {
		return fmt.Errorf("got %d bytes from the server, want %d", n, down)
	}
	return nil
}

// ---------- the server side ----------

// openSidechannel opens the sidechannel of the call ctx belongs to on session.
func openSidechannel(ctx context.Context, session *yamux.Session) (net.Conn, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get(sidechannelMetadata)
	if len(vals) == 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "sidechannel: the call has no %s metadata", sidechannelMetadata)
	}
	id, err := strconv.ParseInt(strings.TrimSpace(vals[len(vals)-1]), 10, 64)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "sidechannel: bad %s: %v", sidechannelMetadata, err)
	}
	c, err := session.Open()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "sidechannel: opening a stream: %v", err)
	}
	c.SetDeadline(time.Now().Add(sidechannelTimeout))
	// The magic and the ID go out as two writes (two yamux frames): the client must not
	// expect them in one.
	var idBytes [8]byte
	binary.BigEndian.PutUint64(idBytes[:], uint64(id))
	for _, part := range [][]byte{[]byte(sidechannelMagic), idBytes[:]} {
		if _, err := c.Write(part); err != nil {
			c.Close()
			return nil, status.Errorf(codes.Unavailable, "sidechannel %d: writing the hello: %v", id, err)
		}
	}
	var ok [2]byte
	n, err := io.ReadFull(c, ok[:])
	if err != nil || string(ok[:]) != "ok" {
		c.Close()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, status.Errorf(codes.DeadlineExceeded, "sidechannel %d: no answer within %v", id, sidechannelTimeout)
		}
		return nil, status.Errorf(codes.Aborted, "sidechannel %d: the client refused it (answered %q, %v)", id, ok[:n], err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

const sidechannelPrefix = "SIDECHANNEL:"

// serveSidechannel is Bench.Echo with data "SIDECHANNEL:<down>" on the server: it opens
// the calling peer's sidechannel, reads the client's pkt-lines to the flush packet
// (checked as stream 1) while it sends <down> raw bytes of stream 2, closes the stream and
// answers "OK up=<received> down=<sent> ms=<elapsed>".
func serveSidechannel(ctx context.Context, session *yamux.Session, spec string) (string, error) {
	down, err := strconv.ParseUint(spec, 10, 64)
	if err != nil {
		return "", status.Errorf(codes.InvalidArgument, "want SIDECHANNEL:<bytes>: %v", err)
	}
	c, err := openSidechannel(ctx, session)
	if err != nil {
		return "", err
	}
	defer c.Close()
	start := time.Now()
	sent := make(chan error, 1)
	go func() { sent <- sendStream(c, 2, down) }()
	// Read to the flush packet before closing: a closed yamux stream (in this yamux) no
	// longer reads, so the close waits for both directions.
	up, rerr := recvStream(newPktReader(c), 1)
	if rerr != nil {
		c.Close()
		<-sent
		code := codes.Internal
		switch {
		case errors.Is(rerr, io.ErrUnexpectedEOF):
			code = codes.DataLoss
		case errors.Is(rerr, errDataMismatch):
			code = codes.InvalidArgument
		}
		logf("sidechannel: reading after %d bytes: %v", up, rerr)
		return "", status.Errorf(code, "sidechannel: reading after %d bytes: %v", up, rerr)
	}
	if err := <-sent; err != nil {
		return "", status.Errorf(codes.Internal, "sidechannel: %v", err)
	}
	if err := c.Close(); err != nil {
		return "", status.Errorf(codes.Internal, "sidechannel: close: %v", err)
	}
	d := time.Since(start)
	logf("sidechannel: got %d bytes, sent %d in %v (%.1f MB/s both ways)", up, down, d, mbps(up+down, d))
	return fmt.Sprintf("OK up=%d down=%d ms=%d", up, down, d.Milliseconds()), nil
}
