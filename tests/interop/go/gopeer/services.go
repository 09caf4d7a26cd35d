package main

// Manual grpc.ServiceDesc registrations (no generated code) for the Echo, Callback and
// Bench services, their handlers, and client-side helpers.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	echoService     = "backchannel.testing.v1.Echo"
	callbackService = "backchannel.testing.v1.Callback"
	benchService    = "backchannel.bench.v1.Bench"
	maxMsgSize      = 64 << 20
)

var anyHandler = (*interface{})(nil)

// ---------- bench data pattern: byte i of a whole transfer is byte(i % 251) ----------

const patternPeriod = 251

// patternBuf holds the pattern for chunks up to 4 MiB; it is read-only after init.
var patternBuf = func() []byte {
	buf := make([]byte, 4<<20+patternPeriod)
	for i := range buf {
		buf[i] = byte(i % patternPeriod)
	}
	return buf
}()

// patternChunk returns n pattern bytes starting at stream offset offset (do not modify).
func patternChunk(offset uint64, n int) []byte {
	start := int(offset % patternPeriod)
	if start+n <= len(patternBuf) {
		return patternBuf[start : start+n]
	}
	buf := make([]byte, n)
	for i := range buf {
		buf[i] = byte((offset + uint64(i)) % patternPeriod)
	}
	return buf
}

func checkPattern(offset uint64, data []byte) bool {
	return bytes.Equal(data, patternChunk(offset, len(data)))
}

// ---------- Echo ----------

type echoServer struct{ name string }

func authorityOf(ctx context.Context) string {
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if a := md.Get(":authority"); len(a) > 0 {
			return a[0]
		}
	}
	return ""
}

func registerEcho(s *grpc.Server, e *echoServer) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: echoService,
		HandlerType: anyHandler,
		Methods: []grpc.MethodDesc{{
			MethodName: "Unary",
			Handler: func(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				req := &EchoRequest{}
				if err := dec(req); err != nil {
					return nil, err
				}
				logf("Echo.Unary %q (:authority=%q)", req.Message, authorityOf(ctx))
				return &EchoResponse{Message: req.Message, Server: e.name}, nil
			},
		}},
		Streams: []grpc.StreamDesc{
			{StreamName: "ServerStream", ServerStreams: true, Handler: func(_ interface{}, st grpc.ServerStream) error {
				req := &EchoRequest{}
				if err := st.RecvMsg(req); err != nil {
					return err
				}
				logf("Echo.ServerStream %q x%d (:authority=%q)", req.Message, req.Count, authorityOf(st.Context()))
				for i := uint32(0); i < req.Count; i++ {
					if err := st.SendMsg(&EchoResponse{Message: fmt.Sprintf("%s-%d", req.Message, i), Server: e.name}); err != nil {
						return err
					}
				}
				return nil
			}},
			{StreamName: "ClientStream", ClientStreams: true, Handler: func(_ interface{}, st grpc.ServerStream) error {
				var sb strings.Builder
				for {
					req := &EchoRequest{}
					if err := st.RecvMsg(req); err == io.EOF {
						break
					} else if err != nil {
						return err
					}
					sb.WriteString(req.Message)
				}
				return st.SendMsg(&EchoResponse{Message: sb.String(), Server: e.name})
			}},
			{StreamName: "Bidi", ServerStreams: true, ClientStreams: true, Handler: func(_ interface{}, st grpc.ServerStream) error {
				for {
					req := &EchoRequest{}
					if err := st.RecvMsg(req); err == io.EOF {
						return nil
					} else if err != nil {
						return err
					}
					if err := st.SendMsg(&EchoResponse{Message: req.Message, Server: e.name}); err != nil {
						return err
					}
				}
			}},
		},
	}, e)
}

// ---------- Bench ----------

// benchServer serves backchannel.bench.v1.Bench. When reverse is set (server role only),
// Bench.Echo with data "REVERSE-BENCH:<bytes>:<chunk>" does not echo: it runs, against the
// CALLING peer's backchannel, Bench.Upload of <bytes> bytes in <chunk>-sized messages
// and then Bench.Download of <bytes> bytes in <chunk>-sized chunks, both carrying the
// byte(i % 251) pattern and both checked, and replies with
// Payload{data: "OK up=<bytes> down=<bytes> ms=<elapsed total>"} or an error status.
// That lets a test make the Go server push (and pull) big data over the reverse channel
// without any method outside the .proto files.
//
// When side is set (server role only), Bench.Echo with data "SIDECHANNEL:<bytes>" opens
// the call's sidechannel instead (see serveSidechannel).
type benchServer struct {
	reverse func(ctx context.Context, total uint64, chunk int) (string, error)
	side    func(ctx context.Context, spec string) (string, error)
}

const reverseBenchPrefix = "REVERSE-BENCH:"

func parseBenchSpec(s string) (uint64, int, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 2 {
		return 0, 0, fmt.Errorf("want <bytes>:<chunk>, got %q", s)
	}
	total, err := strconv.ParseUint(parts[0], 10, 64)
	if err != nil {
		return 0, 0, err
	}
	chunk, err := strconv.Atoi(parts[1])
	if err != nil || chunk <= 0 || chunk > maxMsgSize-64 {
		return 0, 0, fmt.Errorf("bad chunk size %q", parts[1])
	}
	return total, chunk, nil
}

func registerBench(s *grpc.Server, b *benchServer) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: benchService,
		HandlerType: anyHandler,
		Methods: []grpc.MethodDesc{{
			MethodName: "Echo",
			Handler: func(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				req := &Payload{}
				if err := dec(req); err != nil {
					return nil, err
				}
				if b.reverse != nil && bytes.HasPrefix(req.Data, []byte(reverseBenchPrefix)) {
					total, chunk, err := parseBenchSpec(string(req.Data[len(reverseBenchPrefix):]))
					if err != nil {
						return nil, status.Error(codes.InvalidArgument, err.Error())
					}
					msg, err := b.reverse(ctx, total, chunk)
					if err != nil {
						return nil, err
					}
					return &Payload{Data: []byte(msg)}, nil
				}
				if b.side != nil && bytes.HasPrefix(req.Data, []byte(sidechannelPrefix)) {
					msg, err := b.side(ctx, string(req.Data[len(sidechannelPrefix):]))
					if err != nil {
						return nil, err
					}
					return &Payload{Data: []byte(msg)}, nil
				}
				return req, nil
			},
		}},
		Streams: []grpc.StreamDesc{
			{StreamName: "Upload", ClientStreams: true, Handler: func(_ interface{}, st grpc.ServerStream) error {
				var sum Summary
				for {
					req := &Payload{}
					if err := st.RecvMsg(req); err == io.EOF {
						break
					} else if err != nil {
						return err
					}
					if !checkPattern(sum.Bytes, req.Data) {
						return status.Errorf(codes.InvalidArgument, "upload: data mismatch in message %d at stream offset %d", sum.Messages, sum.Bytes)
					}
					sum.Bytes += uint64(len(req.Data))
					sum.Messages++
				}
				return st.SendMsg(&sum)
			}},
			{StreamName: "Download", ServerStreams: true, Handler: func(_ interface{}, st grpc.ServerStream) error {
				req := &DownloadRequest{}
				if err := st.RecvMsg(req); err != nil {
					return err
				}
				chunk := int(req.ChunkSize)
				if chunk <= 0 {
					chunk = 64 << 10
				}
				if chunk > maxMsgSize-64 {
					return status.Errorf(codes.InvalidArgument, "chunk_size %d too large", chunk)
				}
				return sendPattern(req.Bytes, chunk, func(p *Payload) error { return st.SendMsg(p) })
			}},
		},
	}, b)
}

func sendPattern(total uint64, chunk int, send func(*Payload) error) error {
	for off := uint64(0); off < total; {
		n := chunk
		if rem := total - off; rem < uint64(n) {
			n = int(rem)
		}
		if err := send(&Payload{Data: patternChunk(off, n)}); err != nil {
			return err
		}
		off += uint64(n)
	}
	return nil
}

// ---------- client-side helpers (work on any grpc.ClientConn) ----------

func callEchoUnary(ctx context.Context, cc *grpc.ClientConn, msg string) (*EchoResponse, error) {
	resp := &EchoResponse{}
	err := cc.Invoke(ctx, "/"+echoService+"/Unary", &EchoRequest{Message: msg}, resp)
	return resp, err
}

func openEchoServerStream(ctx context.Context, cc *grpc.ClientConn, msg string, count uint32) (grpc.ClientStream, error) {
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{StreamName: "ServerStream", ServerStreams: true}, "/"+echoService+"/ServerStream")
	if err != nil {
		return nil, err
	}
	if err := st.SendMsg(&EchoRequest{Message: msg, Count: count}); err != nil {
		return nil, err
	}
	if err := st.CloseSend(); err != nil {
		return nil, err
	}
	return st, nil
}

// benchUpload streams total bytes of the pattern in chunk-sized messages and checks the Summary.
func benchUpload(ctx context.Context, cc *grpc.ClientConn, total uint64, chunk int) error {
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{StreamName: "Upload", ClientStreams: true}, "/"+benchService+"/Upload")
	if err != nil {
		return err
	}
	var msgs uint64
	if err := sendPattern(total, chunk, func(p *Payload) error { msgs++; return st.SendMsg(p) }); err != nil && err != io.EOF {
		return err
	}
	if err := st.CloseSend(); err != nil {
		return err
	}
	sum := &Summary{}
	if err := st.RecvMsg(sum); err != nil {
		return err
	}
	if sum.Bytes != total || sum.Messages != msgs {
		return fmt.Errorf("upload summary bytes=%d messages=%d, want %d/%d", sum.Bytes, sum.Messages, total, msgs)
	}
	return nil
}

// benchDownload requests total bytes in chunk-sized messages and checks every byte.
func benchDownload(ctx context.Context, cc *grpc.ClientConn, total uint64, chunk int) error {
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{StreamName: "Download", ServerStreams: true}, "/"+benchService+"/Download")
	if err != nil {
		return err
	}
	if err := st.SendMsg(&DownloadRequest{Bytes: total, ChunkSize: uint32(chunk)}); err != nil {
		return err
	}
	if err := st.CloseSend(); err != nil {
		return err
	}
	var got uint64
	for {
		p := &Payload{}
		if err := st.RecvMsg(p); err == io.EOF {
			break
		} else if err != nil {
			return err
		}
		if len(p.Data) > chunk {
			return fmt.Errorf("download: chunk of %d bytes exceeds chunk_size %d", len(p.Data), chunk)
		}
		if !checkPattern(got, p.Data) {
			return fmt.Errorf("download: data mismatch at stream offset %d", got)
		}
		got += uint64(len(p.Data))
	}
	if got != total {
		return fmt.Errorf("download: got %d bytes, want %d", got, total)
	}
	return nil
}

func mbps(n uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / (1 << 20) / d.Seconds()
}
