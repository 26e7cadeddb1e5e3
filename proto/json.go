package proto

import (
	"encoding/base64"
	"encoding/json"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// ferry's command line prints its messages (the walk, the plan, the
// manifest) as JSON that scripts read, in the shape it had before these
// were proto messages: protojson would write 64-bit integers as strings
// and leave out every zero value. AppendJSON writes any message that way,
// from its descriptor alone, so no Go type mirrors the fields:
//
//   - each field under its JSON name (json_name where the .proto sets one),
//     in declaration order; deprecated fields are left out;
//   - every scalar, zero or not: integers as JSON numbers, bytes as base64;
//   - an empty list or map, or an absent message, as null (what a script
//     got for a missing value before).

// Override lets a caller print a field its own way: raw is the field's
// JSON value, or nil to leave the field out; ok false prints it as usual.
type Override func(fd protoreflect.FieldDescriptor, v protoreflect.Value) (raw []byte, ok bool)

// AppendJSON appends m to b as described above.
func AppendJSON(b []byte, m protoreflect.Message, over Override) ([]byte, error) {
	b = append(b, '{')
	fields := m.Descriptor().Fields()
	first := true
	for i := range fields.Len() {
		fd := fields.Get(i)
		if o, ok := fd.Options().(*descriptorpb.FieldOptions); ok && o.GetDeprecated() {
			continue
		}
		v := m.Get(fd)
		var raw []byte
		var done bool
		if over != nil {
			if raw, done = over(fd, v); done && raw == nil {
				continue
			}
		}
		if !first {
			b = append(b, ',')
		}
		first = false
		b = appendString(b, fd.JSONName())
		b = append(b, ':')
		if done {
			b = append(b, raw...)
			continue
		}
		var err error
		switch {
		case fd.IsList():
			b, err = appendList(b, fd, v.List(), over)
		case fd.IsMap():
			b, err = appendMap(b, fd, v.Map(), over)
		case fd.Message() != nil && !m.Has(fd):
			b = append(b, "null"...)
		default:
			b, err = appendValue(b, fd, v, over)
		}
		if err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

func appendList(b []byte, fd protoreflect.FieldDescriptor, l protoreflect.List, over Override) ([]byte, error) {
	if l.Len() == 0 {
		return append(b, "null"...), nil
	}
	b = append(b, '[')
	for i := range l.Len() {
		if i > 0 {
			b = append(b, ',')
		}
		var err error
		if b, err = appendValue(b, fd, l.Get(i), over); err != nil {
			return nil, err
		}
	}
	return append(b, ']'), nil
}

func appendMap(b []byte, fd protoreflect.FieldDescriptor, mp protoreflect.Map, over Override) ([]byte, error) {
	if mp.Len() == 0 {
		return append(b, "null"...), nil
	}
	var keys []protoreflect.MapKey
	mp.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
		keys = append(keys, k)
		return true
	})
	slices.SortFunc(keys, func(a, b protoreflect.MapKey) int { return strings.Compare(a.String(), b.String()) })
	b = append(b, '{')
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, k.String())
		b = append(b, ':')
		var err error
		if b, err = appendValue(b, fd.MapValue(), mp.Get(k), over); err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

// appendValue appends one value of fd's kind (an element, for a list).
func appendValue(b []byte, fd protoreflect.FieldDescriptor, v protoreflect.Value, over Override) ([]byte, error) {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return AppendJSON(b, v.Message(), over)
	case protoreflect.BoolKind:
		return strconv.AppendBool(b, v.Bool()), nil
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind,
		protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return strconv.AppendInt(b, v.Int(), 10), nil
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind, protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return strconv.AppendUint(b, v.Uint(), 10), nil
	case protoreflect.EnumKind:
		return strconv.AppendInt(b, int64(v.Enum()), 10), nil
	case protoreflect.FloatKind:
		return strconv.AppendFloat(b, v.Float(), 'g', -1, 32), nil
	case protoreflect.DoubleKind:
		return strconv.AppendFloat(b, v.Float(), 'g', -1, 64), nil
	case protoreflect.BytesKind:
		return strconv.AppendQuote(b, base64.StdEncoding.EncodeToString(v.Bytes())), nil
	}
	return appendString(b, v.String()), nil
}

// appendString appends s as a JSON string, escaped as encoding/json does.
func appendString(b []byte, s string) []byte {
	q, _ := json.Marshal(s) // a string always marshals
	return append(b, q...)
}

// MarshalJSON prints the walk the way the command line always has.
func (x *Inventory) MarshalJSON() ([]byte, error) { return AppendJSON(nil, x.ProtoReflect(), nil) }

// MarshalJSON prints the plan the way the command line always has.
func (x *Plan) MarshalJSON() ([]byte, error) { return AppendJSON(nil, x.ProtoReflect(), nil) }
