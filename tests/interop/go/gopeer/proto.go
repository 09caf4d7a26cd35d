package main

// Hand-written protobuf messages for proto/backchannel/testing/v1/testing.proto and
// proto/backchannel/bench/v1/bench.proto, encoded with protowire. Debian ships no
// protoc-gen-go-grpc matching its grpc-go, so we avoid code generation entirely: every
// message implements wireMessage, and a codec registered under the name "proto" (the
// content-subtype gRPC uses by default) encodes them. Other proto.Message values fall
// through to grpc-go's own proto codec.

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/encoding/protowire"
)

type wireMessage interface {
	marshalWire(b []byte) []byte
	unmarshalWire(b []byte) error
}

type wireCodec struct{ fallback encoding.Codec }

func (c wireCodec) Name() string { return "proto" }

func (c wireCodec) Marshal(v interface{}) ([]byte, error) {
	if m, ok := v.(wireMessage); ok {
		return m.marshalWire(nil), nil
	}
	if c.fallback != nil {
		return c.fallback.Marshal(v)
	}
	return nil, fmt.Errorf("codec: cannot marshal %T", v)
}

func (c wireCodec) Unmarshal(data []byte, v interface{}) error {
	if m, ok := v.(wireMessage); ok {
		return m.unmarshalWire(data)
	}
	if c.fallback != nil {
		return c.fallback.Unmarshal(data, v)
	}
	return fmt.Errorf("codec: cannot unmarshal into %T", v)
}

func init() {
	encoding.RegisterCodec(wireCodec{fallback: encoding.GetCodec("proto")})
}

// --- encoding helpers (proto3: zero values are omitted) ---

func putString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func putBytes(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func putVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// walkFields calls fn for every field; fn returns the number of bytes it consumed
// (or 0 to have the field skipped as unknown).
func walkFields(b []byte, fn func(num protowire.Number, typ protowire.Type, b []byte) (int, error)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		used, err := fn(num, typ, b)
		if err != nil {
			return err
		}
		if used == 0 {
			used = protowire.ConsumeFieldValue(num, typ, b)
			if used < 0 {
				return protowire.ParseError(used)
			}
		}
		b = b[used:]
	}
	return nil
}

func getVarint(typ protowire.Type, b []byte) (uint64, int, error) {
	if typ != protowire.VarintType {
		return 0, 0, nil
	}
	v, n := protowire.ConsumeVarint(b)
	if n < 0 {
		return 0, 0, protowire.ParseError(n)
	}
	return v, n, nil
}

func getBytes(typ protowire.Type, b []byte) ([]byte, int, error) {
	if typ != protowire.BytesType {
		return nil, 0, nil
	}
	v, n := protowire.ConsumeBytes(b)
	if n < 0 {
		return nil, 0, protowire.ParseError(n)
	}
	return v, n, nil
}

// --- backchannel.testing.v1 ---

// EchoRequest and CallMeBackRequest share the same shape: message=1, count=2.
type EchoRequest struct {
	Message string
	Count   uint32
}

type CallMeBackRequest = EchoRequest

func (m *EchoRequest) marshalWire(b []byte) []byte {
	b = putString(b, 1, m.Message)
	return putVarint(b, 2, uint64(m.Count))
}

func (m *EchoRequest) unmarshalWire(b []byte) error {
	*m = EchoRequest{}
	return walkFields(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		switch num {
		case 1:
			v, n, err := getBytes(typ, b)
			m.Message = string(v)
			return n, err
		case 2:
			v, n, err := getVarint(typ, b)
			m.Count = uint32(v)
			return n, err
		}
		return 0, nil
	})
}

type EchoResponse struct {
	Message string
	Server  string
}

func (m *EchoResponse) marshalWire(b []byte) []byte {
	b = putString(b, 1, m.Message)
	return putString(b, 2, m.Server)
}

func (m *EchoResponse) unmarshalWire(b []byte) error {
	*m = EchoResponse{}
	return walkFields(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		switch num {
		case 1:
			v, n, err := getBytes(typ, b)
			m.Message = string(v)
			return n, err
		case 2:
			v, n, err := getBytes(typ, b)
			m.Server = string(v)
			return n, err
		}
		return 0, nil
	})
}

type CallMeBackResponse struct {
	PeerID uint64
	Reply  *EchoResponse
}

func (m *CallMeBackResponse) marshalWire(b []byte) []byte {
	b = putVarint(b, 1, m.PeerID)
	if m.Reply != nil {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, m.Reply.marshalWire(nil))
	}
	return b
}

func (m *CallMeBackResponse) unmarshalWire(b []byte) error {
	*m = CallMeBackResponse{}
	return walkFields(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		switch num {
		case 1:
			v, n, err := getVarint(typ, b)
			m.PeerID = v
			return n, err
		case 2:
			v, n, err := getBytes(typ, b)
			if err != nil || n == 0 {
				return n, err
			}
			if m.Reply == nil {
				m.Reply = &EchoResponse{}
			}
			// proto3 merge semantics for a repeated sub-message field are not needed here.
			return n, m.Reply.unmarshalWire(v)
		}
		return 0, nil
	})
}

// --- backchannel.bench.v1 ---

type Payload struct{ Data []byte }

func (m *Payload) marshalWire(b []byte) []byte {
	if b == nil {
		b = make([]byte, 0, len(m.Data)+protowire.SizeBytes(len(m.Data))+1)
	}
	return putBytes(b, 1, m.Data)
}

func (m *Payload) unmarshalWire(b []byte) error {
	*m = Payload{}
	return walkFields(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		if num == 1 {
			v, n, err := getBytes(typ, b)
			// Copy: the codec does not promise the input buffer outlives the call.
			m.Data = append([]byte(nil), v...)
			return n, err
		}
		return 0, nil
	})
}

type Summary struct{ Bytes, Messages uint64 }

func (m *Summary) marshalWire(b []byte) []byte {
	b = putVarint(b, 1, m.Bytes)
	return putVarint(b, 2, m.Messages)
}

func (m *Summary) unmarshalWire(b []byte) error {
	*m = Summary{}
	return walkFields(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		switch num {
		case 1:
			v, n, err := getVarint(typ, b)
			m.Bytes = v
			return n, err
		case 2:
			v, n, err := getVarint(typ, b)
			m.Messages = v
			return n, err
		}
		return 0, nil
	})
}

type DownloadRequest struct {
	Bytes     uint64
	ChunkSize uint32
}

func (m *DownloadRequest) marshalWire(b []byte) []byte {
	b = putVarint(b, 1, m.Bytes)
	return putVarint(b, 2, uint64(m.ChunkSize))
}

func (m *DownloadRequest) unmarshalWire(b []byte) error {
	*m = DownloadRequest{}
	return walkFields(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		switch num {
		case 1:
			v, n, err := getVarint(typ, b)
			m.Bytes = v
			return n, err
		case 2:
			v, n, err := getVarint(typ, b)
			m.ChunkSize = uint32(v)
			return n, err
		}
		return 0, nil
	})
}
