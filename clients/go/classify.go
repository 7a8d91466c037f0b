package backstop

// What a provider call produced, in RecordOutcome terms.
//
// When the provider answered with an HTTP status, the client does not
// classify: it sends the status, the error type/code/message and the raw
// headers, and the server's taxonomy decides (one taxonomy for the whole
// fleet: a 429 insufficient_quota is PERSISTENT, a 429 with retry-after
// pauses the fleet). The client classifies only what the server cannot see:
// timeouts, connection failures, unparseable replies and its own bugs.
//
// Provider SDKs are read without depending on them: the Stainless-generated
// Go SDKs (openai-go, anthropic-sdk-go) return errors with an exported
// StatusCode, a *http.Response and a RawJSON() body; Google's return Code,
// Header and Body. Those shapes are read by reflection on exported fields,
// the Go counterpart of the Python client's duck typing.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"sort"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

// Bounds the server enforces on RecordOutcome.headers ([server] max_headers /
// max_header_bytes defaults) and error_type; over them a report is rejected.
const (
	MaxHeaders     = 64
	MaxHeaderBytes = 16384
	MaxErrorType   = 256
)

// Headers the server reads, kept first when a response has too many to send.
var signalPrefixes = []string{"retry-after", "x-ratelimit", "anthropic-ratelimit", "ratelimit", "x-should-retry"}

// HTTPError is a provider's non-2xx answer. The Transport and code calling a
// provider over raw HTTP return it; Guard and Call read the status, headers
// and error body from it (as they do from the provider SDKs' own errors).
type HTTPError struct {
	StatusCode int
	Header     http.Header
	// The error body (bounded), e.g. {"error": {"type": "overloaded_error", ...}}.
	Body []byte
}

func (e *HTTPError) Error() string {
	etype, ecode, msg := errorFields(e.Body)
	detail := composeErrorType(etype, ecode, msg)
	if detail == "" {
		detail = http.StatusText(e.StatusCode)
	}
	return fmt.Sprintf("provider answered %d: %s", e.StatusCode, detail)
}

// NewHTTPError reads a failed response into an *HTTPError (at most 64 KiB of
// its body) and closes the body.
func NewHTTPError(resp *http.Response) *HTTPError {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	return &HTTPError{StatusCode: resp.StatusCode, Header: resp.Header.Clone(), Body: body}
}

// observed holds the fields of an outcome report derived from a call.
type observed struct {
	Outcome      OutcomeClass
	HTTPStatus   int
	ErrorType    string
	Headers      map[string]string
	InputTokens  uint64
	OutputTokens uint64
	// A short description for AllTargetsFailedError and logs.
	Message string
}

// NormalizeHeaders turns provider response headers into what RecordOutcome
// accepts: lower-case names, repeated values joined with ", ", rate-limit and
// retry headers first, the rest up to the server's bounds.
func NormalizeHeaders(h http.Header) map[string]string {
	if len(h) == 0 {
		return nil
	}
	merged := make(map[string]string, len(h))
	for k, vs := range h {
		key := strings.ToLower(strings.TrimSpace(k))
		if key == "" {
			continue
		}
		v := strings.Join(vs, ", ")
		if prev, ok := merged[key]; ok {
			v = prev + ", " + v
		}
		merged[key] = v
	}
	keys := make([]string, 0, len(merged))
	for k := range merged {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		si, sj := isSignal(keys[i]), isSignal(keys[j])
		if si != sj {
			return si
		}
		return keys[i] < keys[j]
	})
	out := make(map[string]string, len(keys))
	size := 0
	for _, k := range keys {
		cost := len(k) + len(merged[k])
		if len(out) >= MaxHeaders || size+cost > MaxHeaderBytes {
			continue
		}
		out[k] = merged[k]
		size += cost
	}
	return out
}

func isSignal(k string) bool {
	for _, p := range signalPrefixes {
		if strings.HasPrefix(k, p) {
			return true
		}
	}
	return false
}

// errorFields reads (type, code, message) from an error body in the
// providers' shapes: Anthropic {"type":"error","error":{"type","message"}},
// OpenAI {"error":{"message","type","code"}} (openai-go keeps only the inner
// object), Gemini {"error":{"code","message","status"}}.
func errorFields(body []byte) (etype, ecode, msg string) {
	if len(body) == 0 {
		return
	}
	var doc map[string]interface{}
	if json.Unmarshal(body, &doc) != nil {
		return
	}
	obj := doc
	if inner, ok := doc["error"].(map[string]interface{}); ok {
		obj = inner
	}
	if t, ok := obj["type"].(string); ok && t != "error" {
		etype = t
	}
	switch c := obj["code"].(type) {
	case string:
		ecode = c
	case float64:
		ecode = fmt.Sprintf("%g", c)
	}
	if s, ok := obj["status"].(string); ok && s != "" {
		if ecode != "" {
			ecode += " " + s
		} else {
			ecode = s
		}
	}
	if m, ok := obj["message"].(string); ok {
		msg = m
	}
	return
}

// composeErrorType builds the error_type sent to the server: type, code and
// message. The server matches markers as substrings ("insufficient_quota",
// "credit balance", "per day"...) and some appear only in the message
// (Anthropic's "Your credit balance is too low" is a 400
// invalid_request_error), so the message is included, clipped to 256 bytes.
func composeErrorType(etype, ecode, msg string) string {
	var parts []string
	for _, p := range []string{etype, ecode} {
		if p != "" && (len(parts) == 0 || parts[0] != p) {
			parts = append(parts, p)
		}
	}
	head := strings.Join(parts, " ")
	if msg != "" {
		if head != "" {
			head += ": " + msg
		} else {
			head = msg
		}
	}
	return clip(strings.Join(strings.Fields(head), " "), MaxErrorType)
}

// clip shortens s to at most n bytes without splitting a UTF-8 sequence.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// httpDetails is what an error chain says about a provider's HTTP answer.
type httpDetails struct {
	status            int
	header            http.Header
	body              []byte
	etype, ecode, msg string
}

func validStatus(s int) bool { return s >= 100 && s <= 599 }

var (
	httpHeaderType   = reflect.TypeOf(http.Header{})
	httpResponseType = reflect.TypeOf(&http.Response{})
)

// httpOf walks err's chain for an HTTP status: *HTTPError, or an SDK error
// with exported StatusCode / Response / Code+Header fields.
func httpOf(err error) (httpDetails, bool) {
	var found httpDetails
	ok := false
	walkErrors(err, func(e error) bool {
		if he, isHE := e.(*HTTPError); isHE {
			found = httpDetails{status: he.StatusCode, header: he.Header, body: he.Body}
			ok = validStatus(he.StatusCode)
			return ok
		}
		d, hit := reflectHTTP(e)
		if hit {
			found, ok = d, true
			return true
		}
		return false
	})
	if ok && (found.etype == "" && found.ecode == "" && found.msg == "") {
		found.etype, found.ecode, found.msg = errorFields(found.body)
	}
	return found, ok
}

func reflectHTTP(e error) (d httpDetails, ok bool) {
	v := reflect.ValueOf(e)
	for v.Kind() == reflect.Ptr || v.Kind() == reflect.Interface {
		if v.IsNil() {
			return d, false
		}
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return d, false
	}
	intField := func(name string) int {
		f := v.FieldByName(name)
		if f.IsValid() && f.CanInterface() {
			switch f.Kind() {
			case reflect.Int, reflect.Int32, reflect.Int64:
				return int(f.Int())
			}
		}
		return 0
	}
	strField := func(name string) string {
		f := v.FieldByName(name)
		if f.IsValid() && f.CanInterface() && f.Kind() == reflect.String {
			return f.String()
		}
		return ""
	}
	var resp *http.Response
	if f := v.FieldByName("Response"); f.IsValid() && f.CanInterface() && f.Type() == httpResponseType && !f.IsNil() {
		resp = f.Interface().(*http.Response)
	}
	var header http.Header
	if f := v.FieldByName("Header"); f.IsValid() && f.CanInterface() && f.Type() == httpHeaderType {
		header, _ = f.Interface().(http.Header)
	}
	status := intField("StatusCode")
	if !validStatus(status) && resp != nil {
		status = resp.StatusCode
	}
	if !validStatus(status) && header != nil {
		// googleapi.Error: Code is the HTTP status when it comes with headers.
		status = intField("Code")
	}
	if !validStatus(status) {
		return d, false
	}
	d.status = status
	d.header = header
	if resp != nil && d.header == nil {
		d.header = resp.Header
	}
	if raw, isRaw := e.(interface{ RawJSON() string }); isRaw {
		d.body = []byte(raw.RawJSON())
	} else if f := v.FieldByName("Body"); f.IsValid() && f.CanInterface() {
		switch b := f.Interface().(type) {
		case string:
			d.body = []byte(b)
		case []byte:
			d.body = b
		}
	}
	d.etype, d.ecode, d.msg = errorFields(d.body)
	if d.etype == "" {
		d.etype = strField("Type")
	}
	if d.ecode == "" {
		if c := strField("Code"); c != "" {
			d.ecode = c
		}
	}
	if d.msg == "" {
		d.msg = strField("Message")
	}
	return d, true
}

// walkErrors visits err and everything it wraps (Unwrap() error and
// Unwrap() []error), depth first, until visit returns true.
func walkErrors(err error, visit func(error) bool) bool {
	for err != nil {
		if visit(err) {
			return true
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, inner := range u.Unwrap() {
				if walkErrors(inner, visit) {
					return true
				}
			}
			return false
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		default:
			return false
		}
	}
	return false
}

func typeName(err error) string {
	return strings.TrimPrefix(fmt.Sprintf("%T", err), "*")
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.ETIMEDOUT)
}

func isConnectionError(err error) bool {
	for _, target := range []error{
		syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
		syscall.EHOSTUNREACH, syscall.ENETUNREACH, io.ErrUnexpectedEOF, io.EOF, net.ErrClosed,
	} {
		if errors.Is(err, target) {
			return true
		}
	}
	var opErr *net.OpError
	var dnsErr *net.DNSError
	return errors.As(err, &opErr) || errors.As(err, &dnsErr)
}

func isParseError(err error) bool {
	var m *MalformedOutputError
	var so *StructuredOutputError
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	return errors.As(err, &m) || errors.As(err, &so) || errors.As(err, &se) || errors.As(err, &te)
}

// observeError turns what a provider call returned into outcome-report fields:
//
//	error                                        reported
//	anything carrying an HTTP status             status + "type code: message" + headers; the server classifies
//	MalformedOutputError, JSON syntax/type error PARTIAL
//	context.Canceled                             BAD_INPUT "cancelled"
//	deadline exceeded, net timeouts              TIMEOUT
//	refused/reset connections, net.OpError, EOF  TRANSIENT
//	anything else                                BAD_INPUT "client_error: Type"
//
// The last two rows keep cancellations and the agent's own bugs from being
// blamed on the provider: BAD_INPUT never moves the breaker, but the report
// still releases the permit's reserved budget and any half-open probe slot.
func observeError(err error) observed {
	if d, ok := httpOf(err); ok {
		msg := d.msg
		if msg == "" {
			msg = err.Error()
		}
		return observed{
			HTTPStatus: d.status,
			ErrorType:  composeErrorType(d.etype, d.ecode, d.msg),
			Headers:    NormalizeHeaders(d.header),
			Message:    msg,
		}
	}
	desc := err.Error()
	switch {
	case isParseError(err):
		return observed{Outcome: OutcomePartial, ErrorType: clip("malformed_output: "+typeName(err), MaxErrorType), Message: desc}
	case errors.Is(err, context.Canceled):
		return observed{Outcome: OutcomeBadInput, ErrorType: "cancelled", Message: "cancelled"}
	case isTimeout(err):
		return observed{Outcome: OutcomeTimeout, ErrorType: clip("timeout: "+typeName(err), MaxErrorType), Message: desc}
	case isConnectionError(err):
		return observed{Outcome: OutcomeTransient, ErrorType: clip("connection_error: "+desc, MaxErrorType), Message: desc}
	}
	return observed{Outcome: OutcomeBadInput, ErrorType: clip("client_error: "+typeName(err), MaxErrorType), Message: desc}
}

// Usage reads token usage from a provider's JSON response body: Anthropic's
// usage.input_tokens / output_tokens or OpenAI's usage.prompt_tokens /
// completion_tokens (also input_tokens / output_tokens of the Responses API).
func Usage(body []byte) (input, output uint64, ok bool) {
	var doc struct {
		Usage   *usageJSON `json:"usage"`
		Message *struct {
			Usage *usageJSON `json:"usage"`
		} `json:"message"`
		Response *struct {
			Usage *usageJSON `json:"usage"`
		} `json:"response"`
	}
	if json.Unmarshal(body, &doc) != nil {
		return 0, 0, false
	}
	u := doc.Usage
	if u == nil && doc.Message != nil {
		u = doc.Message.Usage // Anthropic's streaming message_start
	}
	if u == nil && doc.Response != nil {
		u = doc.Response.Usage // OpenAI Responses API's streaming response.completed
	}
	if u == nil {
		return 0, 0, false
	}
	return u.input(), u.output(), true
}

type usageJSON struct {
	InputTokens      *float64 `json:"input_tokens"`
	OutputTokens     *float64 `json:"output_tokens"`
	PromptTokens     *float64 `json:"prompt_tokens"`
	CompletionTokens *float64 `json:"completion_tokens"`
}

func nonneg(p *float64) uint64 {
	if p == nil || *p < 0 {
		return 0
	}
	return uint64(*p)
}

func (u *usageJSON) input() uint64 {
	if u.InputTokens != nil {
		return nonneg(u.InputTokens)
	}
	return nonneg(u.PromptTokens)
}

func (u *usageJSON) output() uint64 {
	if u.OutputTokens != nil {
		return nonneg(u.OutputTokens)
	}
	return nonneg(u.CompletionTokens)
}

// sleepCtx waits d or until ctx is done (then it returns ctx's error).
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
