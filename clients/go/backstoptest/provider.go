package backstoptest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
)

// Behaviour is one scripted answer of the FakeProvider.
type Behaviour struct {
	Status int
	// The JSON error body for failures.
	Body interface{}
	// Extra response headers.
	Header map[string]string
	// The reply text of a success ("" = "reply from MODEL").
	Text         string
	OutputTokens int
	// Wait this long before answering (provokes client timeouts).
	Hang time.Duration
}

// OK is a 200.
func OK() Behaviour { return Behaviour{Status: 200, OutputTokens: 12} }

// Reply is a 200 whose content is exactly text.
func Reply(text string) Behaviour { return Behaviour{Status: 200, Text: text, OutputTokens: 12} }

func anthropicError(status int, etype, msg string, h map[string]string) Behaviour {
	return Behaviour{Status: status, Header: h,
		Body: map[string]interface{}{"type": "error", "error": map[string]interface{}{"type": etype, "message": msg}}}
}

func openaiError(status int, etype string, code interface{}, msg string, h map[string]string) Behaviour {
	return Behaviour{Status: status, Header: h,
		Body: map[string]interface{}{"error": map[string]interface{}{"message": msg, "type": etype, "param": nil, "code": code}}}
}

// Overloaded is Anthropic's 529 overloaded_error.
func Overloaded() Behaviour { return anthropicError(529, "overloaded_error", "Overloaded", nil) }

// ServerError is a 500 api_error.
func ServerError() Behaviour { return anthropicError(500, "api_error", "Internal server error", nil) }

// Unavailable is OpenAI's 503 server_is_overloaded.
func Unavailable() Behaviour {
	return openaiError(503, "server_error", "server_is_overloaded", "The server is overloaded", nil)
}

// RateLimitedOpenAI is OpenAI's 429 with retry-after and x-ratelimit-* headers.
func RateLimitedOpenAI(retryAfter time.Duration) Behaviour {
	secs := fmt.Sprintf("%g", retryAfter.Seconds())
	return openaiError(429, "requests", "rate_limit_exceeded",
		"Rate limit reached for gpt-4o in organization org-test on requests per min (RPM): Limit 500, Used 500.",
		map[string]string{
			"retry-after":                    secs,
			"x-ratelimit-limit-requests":     "500",
			"x-ratelimit-remaining-requests": "0",
			"x-ratelimit-reset-requests":     secs + "s",
			"x-ratelimit-limit-tokens":       "30000",
			"x-ratelimit-remaining-tokens":   "29000",
			"x-ratelimit-reset-tokens":       "120ms",
		})
}

// RateLimitedAnthropic is Anthropic's 429 rate_limit_error with retry-after
// and anthropic-ratelimit-* headers.
func RateLimitedAnthropic(retryAfter time.Duration) Behaviour {
	secs := int(retryAfter.Seconds() + 0.5)
	if secs < 1 {
		secs = 1
	}
	reset := time.Now().UTC().Add(retryAfter).Format(time.RFC3339)
	return anthropicError(429, "rate_limit_error", "Number of requests has exceeded your rate limit", map[string]string{
		"retry-after":                            fmt.Sprint(secs),
		"anthropic-ratelimit-requests-limit":     "50",
		"anthropic-ratelimit-requests-remaining": "0",
		"anthropic-ratelimit-requests-reset":     reset,
		"anthropic-ratelimit-tokens-limit":       "80000",
		"anthropic-ratelimit-tokens-remaining":   "64000",
		"anthropic-ratelimit-tokens-reset":       reset,
	})
}

// InsufficientQuota is OpenAI's 429 insufficient_quota: PERSISTENT with a rate-limit status.
func InsufficientQuota() Behaviour {
	return openaiError(429, "insufficient_quota", "insufficient_quota", "You exceeded your current quota, please check your plan.", nil)
}

// Unauthorized is Anthropic's 401 authentication_error.
func Unauthorized() Behaviour {
	return anthropicError(401, "authentication_error", "invalid x-api-key", nil)
}

// ContextLength is OpenAI's 400 context_length_exceeded.
func ContextLength() Behaviour {
	return openaiError(400, "invalid_request_error", "context_length_exceeded",
		"This model's maximum context length is 128000 tokens. However, your messages resulted in 150000 tokens.", nil)
}

// Hang waits d, then answers then.
func Hang(d time.Duration, then Behaviour) Behaviour {
	then.Hang = d
	return then
}

// FakeProvider is a scripted fake LLM provider on a loopback port. It answers
// POST /v1/messages (Anthropic's shape) and POST /v1/chat/completions
// (OpenAI's), both also streaming ("stream": true, server-sent events), and
// fails the way the real ones do.
type FakeProvider struct {
	URL string
	srv *httptest.Server

	mu       sync.Mutex
	scripts  map[string][]Behaviour
	defaults map[string]*Behaviour
	calls    map[string]int
}

// NewFakeProvider starts one; Close it when done.
func NewFakeProvider() *FakeProvider {
	p := &FakeProvider{scripts: map[string][]Behaviour{}, defaults: map[string]*Behaviour{}, calls: map[string]int{}}
	p.srv = httptest.NewServer(http.HandlerFunc(p.serve))
	p.URL = p.srv.URL
	return p
}

// Close stops the server.
func (p *FakeProvider) Close() { p.srv.Close() }

// Script makes the next len(b) calls to model answer b, in order. Models are
// named as in the request body ("claude-sonnet") or with a provider prefix
// ("anthropic/claude-sonnet"): only the part after the last "/" counts.
func (p *FakeProvider) Script(model string, b ...Behaviour) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := short(model)
	p.scripts[m] = append(p.scripts[m], b...)
}

// SetDefault sets what model answers once its script is used up (nil: 200s): an outage.
func (p *FakeProvider) SetDefault(model string, b *Behaviour) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.defaults[short(model)] = b
}

// Calls is how many requests model received.
func (p *FakeProvider) Calls(model string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls[short(model)]
}

func short(model string) string {
	if i := strings.LastIndexByte(model, '/'); i >= 0 {
		return model[i+1:]
	}
	return model
}

func (p *FakeProvider) next(model string) Behaviour {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls[model]++
	if q := p.scripts[model]; len(q) > 0 {
		p.scripts[model] = q[1:]
		return q[0]
	}
	if d := p.defaults[model]; d != nil {
		return *d
	}
	return OK()
}

func (p *FakeProvider) serve(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model    string        `json:"model"`
		Stream   bool          `json:"stream"`
		Messages []interface{} `json:"messages"`
		Prompt   string        `json:"prompt"`
	}
	body, _ := io.ReadAll(r.Body)
	if r.Method != http.MethodPost || json.Unmarshal(body, &req) != nil || req.Model == "" {
		writeJSON(w, 400, nil, map[string]interface{}{"error": map[string]interface{}{"type": "invalid_request_error", "message": "want a POST with a JSON body naming a model"}})
		return
	}
	openai := strings.HasSuffix(r.URL.Path, "/chat/completions")
	if !openai && !strings.HasSuffix(r.URL.Path, "/messages") {
		writeJSON(w, 404, nil, map[string]interface{}{"error": map[string]interface{}{"type": "not_found_error", "message": r.URL.Path}})
		return
	}
	b := p.next(short(req.Model))
	if b.Hang > 0 {
		select {
		case <-time.After(b.Hang):
		case <-r.Context().Done():
			return
		}
	}
	status := b.Status
	if status == 0 {
		status = 200
	}
	if status >= 300 {
		writeJSON(w, status, b.Header, b.Body)
		return
	}
	text := b.Text
	if text == "" {
		text = "reply from " + req.Model
	}
	in := len(body)/4 + 1
	out := b.OutputTokens
	if req.Stream {
		writeStream(w, b.Header, openai, req.Model, text, in, out)
		return
	}
	if openai {
		writeJSON(w, status, b.Header, map[string]interface{}{
			"id": "chatcmpl-fake", "object": "chat.completion", "model": req.Model,
			"choices": []interface{}{map[string]interface{}{"index": 0, "finish_reason": "stop",
				"message": map[string]interface{}{"role": "assistant", "content": text}}},
			"usage": map[string]interface{}{"prompt_tokens": in, "completion_tokens": out, "total_tokens": in + out},
		})
		return
	}
	writeJSON(w, status, b.Header, map[string]interface{}{
		"id": "msg_fake", "type": "message", "role": "assistant", "model": req.Model,
		"content": []interface{}{map[string]interface{}{"type": "text", "text": text}},
		"usage":   map[string]interface{}{"input_tokens": in, "output_tokens": out},
	})
}

func writeJSON(w http.ResponseWriter, status int, h map[string]string, v interface{}) {
	for k, val := range h {
		w.Header().Set(k, val)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeStream(w http.ResponseWriter, h map[string]string, openai bool, model, text string, in, out int) {
	for k, val := range h {
		w.Header().Set(k, val)
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(200)
	send := func(event string, v interface{}) {
		data, _ := json.Marshal(v)
		if event != "" {
			fmt.Fprintf(w, "event: %s\n", event)
		}
		fmt.Fprintf(w, "data: %s\n\n", data)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	if openai {
		send("", map[string]interface{}{"object": "chat.completion.chunk", "model": model,
			"choices": []interface{}{map[string]interface{}{"index": 0, "delta": map[string]interface{}{"content": text}}}})
		send("", map[string]interface{}{"object": "chat.completion.chunk", "model": model, "choices": []interface{}{},
			"usage": map[string]interface{}{"prompt_tokens": in, "completion_tokens": out}})
		fmt.Fprint(w, "data: [DONE]\n\n")
		return
	}
	send("message_start", map[string]interface{}{"type": "message_start", "message": map[string]interface{}{
		"model": model, "usage": map[string]interface{}{"input_tokens": in, "output_tokens": 1}}})
	send("content_block_delta", map[string]interface{}{"type": "content_block_delta", "index": 0,
		"delta": map[string]interface{}{"type": "text_delta", "text": text}})
	send("message_delta", map[string]interface{}{"type": "message_delta", "usage": map[string]interface{}{"output_tokens": out}})
	send("message_stop", map[string]interface{}{"type": "message_stop"})
}

// Completion is a successful answer of Complete.
type Completion struct {
	Text         string
	Model        string
	InputTokens  uint64
	OutputTokens uint64
	Header       http.Header
}

// Complete is a minimal provider SDK for tests and examples: one
// Anthropic-shaped call over hc (nil: http.DefaultClient) to model. A non-2xx
// answer is a *backstop.HTTPError, like an SDK's status error.
func (p *FakeProvider) Complete(ctx context.Context, hc *http.Client, model, prompt string) (*Completion, error) {
	return Complete(ctx, hc, p.URL, model, prompt)
}

// Complete is FakeProvider.Complete for a provider known by URL (another process's).
func Complete(ctx context.Context, hc *http.Client, baseURL, model, prompt string) (*Completion, error) {
	if hc == nil {
		hc = http.DefaultClient
	}
	body, _ := json.Marshal(map[string]interface{}{"model": short(model), "max_tokens": 256,
		"messages": []interface{}{map[string]interface{}{"role": "user", "content": prompt}}})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+"/v1/messages", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 300 {
		return nil, backstop.NewHTTPError(resp)
	}
	defer resp.Body.Close()
	var msg struct {
		Model   string `json:"model"`
		Content []struct {
			Text string `json:"text"`
		} `json:"content"`
		Usage struct {
			InputTokens  uint64 `json:"input_tokens"`
			OutputTokens uint64 `json:"output_tokens"`
		} `json:"usage"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&msg); err != nil {
		return nil, backstop.Malformed("", err)
	}
	c := &Completion{Model: msg.Model, InputTokens: msg.Usage.InputTokens, OutputTokens: msg.Usage.OutputTokens, Header: resp.Header}
	for _, part := range msg.Content {
		c.Text += part.Text
	}
	return c, nil
}
