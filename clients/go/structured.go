package backstop

// Structured output: a reply is parsed as JSON and validated; an invalid one
// is reported as PARTIAL (the provider answered, the answer was unusable),
// the server advises CORRECT_AND_RETRY, and the same model is asked again with
// a correction. Running out of corrections is a *StructuredOutputError, and
// Call does not fall back on it: another model would need the same corrections.

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
)

// StructuredOutputError: the reply still did not match after MaxCorrections
// correction prompts. Reply is the last raw reply; Errors each attempt's problem.
type StructuredOutputError struct {
	Reply       string
	Errors      []string
	Corrections int
}

func (e *StructuredOutputError) Error() string {
	last := "no reply"
	if len(e.Errors) > 0 {
		last = e.Errors[len(e.Errors)-1]
	}
	return fmt.Sprintf("backstop: structured output still invalid after %d correction(s): %s", e.Corrections, last)
}

// Correction is what a ReplyFunc gets on a retry after an invalid reply.
type Correction struct {
	// 1 for the first correction.
	Number int
	// The invalid reply and what was wrong with it.
	Reply string
	Err   error
	// A prompt to append to the conversation (as a user message, after the
	// invalid reply as an assistant message).
	Prompt string
}

// ReplyFunc makes one provider call and returns the reply's text. c is nil
// on the first try.
type ReplyFunc func(ctx context.Context, p Permit, c *Correction) (string, Result, error)

// StructuredOptions configures Structured.
type StructuredOptions struct {
	// A JSON Schema (the subset: type, properties, required,
	// additionalProperties, items, enum, const, minimum, maximum, minLength,
	// maxLength, minItems, maxItems). nil accepts any JSON.
	Schema map[string]interface{}
	// Extra validation of the decoded value (optional).
	Validate func(v interface{}) error
	// Correction prompts before giving up (default 2; -1 for none).
	MaxCorrections int
}

// Structured wraps fn for Call (or Guard): the reply is parsed as JSON (code
// fences stripped), validated, and decoded into out (a pointer) when valid.
// Use a fresh wrapper per Call: it counts the corrections of one request.
func Structured(fn ReplyFunc, o StructuredOptions, out interface{}) Func {
	max := o.MaxCorrections
	if max == 0 {
		max = 2
	} else if max < 0 {
		max = 0
	}
	var mu sync.Mutex
	var problems []string
	var pending *Correction
	return func(ctx context.Context, p Permit) (Result, error) {
		mu.Lock()
		c := pending
		mu.Unlock()
		text, res, err := fn(ctx, p, c)
		if err != nil {
			return res, err
		}
		_, verr := parseReply(text, o)
		if verr == nil {
			if out != nil {
				if err := json.Unmarshal([]byte(stripFences(text)), out); err != nil {
					verr = err
				}
			}
		}
		if verr == nil {
			return res, nil
		}
		mu.Lock()
		defer mu.Unlock()
		problems = append(problems, verr.Error())
		n := 1
		if pending != nil {
			n = pending.Number + 1
		}
		if n > max {
			return res, &StructuredOutputError{Reply: text, Errors: append([]string(nil), problems...), Corrections: n - 1}
		}
		pending = &Correction{Number: n, Reply: text, Err: verr, Prompt: fmt.Sprintf(
			"Your previous reply was not valid: %s. Reply with JSON only, matching the requested schema.", verr)}
		return res, Malformed(text, verr)
	}
}

func stripFences(text string) string {
	t := strings.TrimSpace(text)
	if strings.HasPrefix(t, "```") {
		if nl := strings.IndexByte(t, '\n'); nl >= 0 {
			t = t[nl+1:]
		}
		t = strings.TrimSuffix(strings.TrimSpace(t), "```")
	}
	return strings.TrimSpace(t)
}

func parseReply(text string, o StructuredOptions) (interface{}, error) {
	var v interface{}
	dec := json.NewDecoder(strings.NewReader(stripFences(text)))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("not JSON: %v", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("not JSON: text after the value")
	}
	if o.Schema != nil {
		if err := validateSchema(v, o.Schema, "$"); err != nil {
			return nil, err
		}
	}
	if o.Validate != nil {
		if err := o.Validate(v); err != nil {
			return nil, err
		}
	}
	return v, nil
}

func jsonType(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case []interface{}:
		return "array"
	case map[string]interface{}:
		return "object"
	case json.Number:
		if f, err := x.Float64(); err == nil && f == math.Trunc(f) && !strings.ContainsAny(string(x), ".eE") {
			return "integer"
		}
		return "number"
	}
	return "unknown"
}

func typeMatches(actual, want string) bool {
	return actual == want || (want == "number" && actual == "integer")
}

func num(v interface{}) (float64, bool) {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	case float64:
		return x, true
	case int:
		return float64(x), true
	}
	return 0, false
}

// validateSchema checks v against the JSON Schema subset Structured documents.
func validateSchema(v interface{}, s map[string]interface{}, path string) error {
	if t, ok := s["type"]; ok {
		actual := jsonType(v)
		var allowed []string
		switch tt := t.(type) {
		case string:
			allowed = []string{tt}
		case []interface{}:
			for _, x := range tt {
				if str, ok := x.(string); ok {
					allowed = append(allowed, str)
				}
			}
		}
		match := false
		for _, a := range allowed {
			if typeMatches(actual, a) {
				match = true
			}
		}
		if !match {
			return fmt.Errorf("%s: expected %s, got %s", path, strings.Join(allowed, " or "), actual)
		}
	}
	if enum, ok := s["enum"].([]interface{}); ok {
		found := false
		for _, e := range enum {
			if jsonEqual(e, v) {
				found = true
			}
		}
		if !found {
			return fmt.Errorf("%s: not one of the allowed values", path)
		}
	}
	if c, ok := s["const"]; ok && !jsonEqual(c, v) {
		return fmt.Errorf("%s: must be %v", path, c)
	}
	if f, ok := num(v); ok {
		if m, ok := num(s["minimum"]); ok && f < m {
			return fmt.Errorf("%s: %v is below the minimum %v", path, f, m)
		}
		if m, ok := num(s["maximum"]); ok && f > m {
			return fmt.Errorf("%s: %v is above the maximum %v", path, f, m)
		}
	}
	if str, ok := v.(string); ok {
		n := float64(len([]rune(str)))
		if m, ok := num(s["minLength"]); ok && n < m {
			return fmt.Errorf("%s: shorter than %v", path, m)
		}
		if m, ok := num(s["maxLength"]); ok && n > m {
			return fmt.Errorf("%s: longer than %v", path, m)
		}
	}
	if arr, ok := v.([]interface{}); ok {
		n := float64(len(arr))
		if m, ok := num(s["minItems"]); ok && n < m {
			return fmt.Errorf("%s: fewer than %v items", path, m)
		}
		if m, ok := num(s["maxItems"]); ok && n > m {
			return fmt.Errorf("%s: more than %v items", path, m)
		}
		if items, ok := s["items"].(map[string]interface{}); ok {
			for i, it := range arr {
				if err := validateSchema(it, items, fmt.Sprintf("%s[%d]", path, i)); err != nil {
					return err
				}
			}
		}
	}
	if obj, ok := v.(map[string]interface{}); ok {
		props, _ := s["properties"].(map[string]interface{})
		if req, ok := s["required"].([]interface{}); ok {
			for _, r := range req {
				if name, ok := r.(string); ok {
					if _, present := obj[name]; !present {
						return fmt.Errorf("%s: missing required property %q", path, name)
					}
				}
			}
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if ps, ok := props[k].(map[string]interface{}); ok {
				if err := validateSchema(obj[k], ps, path+"."+k); err != nil {
					return err
				}
				continue
			}
			switch ap := s["additionalProperties"].(type) {
			case bool:
				if !ap {
					return fmt.Errorf("%s: unexpected property %q", path, k)
				}
			case map[string]interface{}:
				if err := validateSchema(obj[k], ap, path+"."+k); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func jsonEqual(a, b interface{}) bool {
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	if err1 != nil || err2 != nil {
		return false
	}
	var na, nb interface{}
	_ = json.Unmarshal(ja, &na)
	_ = json.Unmarshal(jb, &nb)
	ja, _ = json.Marshal(na)
	jb, _ = json.Marshal(nb)
	return string(ja) == string(jb)
}
