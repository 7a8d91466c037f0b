package backstop

// Conversions between the generated messages and this package's types.

import (
	"time"

	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func durOf(d *durationpb.Duration) time.Duration {
	if d == nil {
		return 0
	}
	return d.AsDuration()
}

func pbDur(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}

func timeOf(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

func admissionOf(target string, r *pb.CanProceedResponse) Admission {
	return Admission{
		Target:       target,
		Allowed:      r.GetAllowed(),
		Reason:       Reason(r.GetReason()),
		State:        BreakerState(r.GetState()),
		RetryAfter:   durOf(r.GetRetryAfter()),
		Permit:       r.GetPermit(),
		KeySlot:      r.GetKeySlot(),
		ShadowReason: Reason(r.GetShadowReason()),
		Raw:          r,
	}
}

func recordRequest(rep OutcomeReport) *pb.RecordOutcomeRequest {
	return &pb.RecordOutcomeRequest{
		Target:       rep.Target,
		Permit:       rep.Permit,
		Outcome:      pb.OutcomeClass(rep.Outcome),
		HttpStatus:   int32(rep.HTTPStatus),
		ErrorType:    rep.ErrorType,
		Latency:      pbDur(rep.Latency),
		RetryAfter:   pbDur(rep.RetryAfter),
		InputTokens:  rep.InputTokens,
		OutputTokens: rep.OutputTokens,
		Attempt:      uint32(max0(rep.Attempt)),
		Headers:      rep.Headers,
		KeySlot:      rep.KeySlot,
		Caller:       rep.Caller,
		RequestId:    rep.RequestID,
		Finish:       pb.RequestResult(rep.Finish),
	}
}

func max0(n int) int {
	if n < 0 {
		return 0
	}
	return n
}

func outcomeOf(target string, r *pb.RecordOutcomeResponse) OutcomeResult {
	res := OutcomeResult{
		Target:       target,
		ClassifiedAs: OutcomeClass(r.GetClassifiedAs()),
		State:        BreakerState(r.GetState()),
		StalePermit:  r.GetStalePermit(),
		Duplicate:    r.GetDuplicate(),
		Cost:         r.GetCost(),
		Raw:          r,
	}
	if a := r.GetRetry(); a != nil {
		res.Retry = RetryAdvice{Retry: a.GetRetry(), Delay: durOf(a.GetDelay()), Reason: RetryReason(a.GetReason())}
	}
	// RETRY_REASON_CIRCUIT_OPEN means "do not retry this target, fall back":
	// honoured even if the retry flag were set.
	if res.Retry.Reason == RetryReasonCircuitOpen {
		res.Retry.Retry = false
	}
	return res
}

func routeOf(r *pb.RouteResponse) RouteDecision {
	d := RouteDecision{
		Target:            r.GetTarget(),
		Permit:            r.GetPermit(),
		KeySlot:           r.GetKeySlot(),
		FallbackDepth:     int(r.GetFallbackDepth()),
		MaxTokens:         r.GetMaxTokens(),
		CostPerMTokInput:  r.GetCostPerMtokInput(),
		CostPerMTokOutput: r.GetCostPerMtokOutput(),
		RetryAfter:        durOf(r.GetRetryAfter()),
		State:             BreakerState(r.GetState()),
		Strategy:          RouteStrategy(r.GetStrategy()),
		Reason:            r.GetReason(),
		Raw:               r,
	}
	for _, s := range r.GetSkipped() {
		d.Skipped = append(d.Skipped, Skip{Target: s.GetTarget(), Reason: Reason(s.GetReason()), RetryAfter: durOf(s.GetRetryAfter())})
	}
	return d
}

func itemOf(i *pb.DeferredItem) *DeferredItem {
	md := map[string]string{}
	for k, v := range i.GetMetadata() {
		md[k] = v
	}
	return &DeferredItem{
		ID:             i.GetId(),
		Queue:          i.GetQueue(),
		Payload:        i.GetPayload(),
		Metadata:       md,
		LeaseToken:     i.GetLeaseToken(),
		Attempt:        int(i.GetAttempt()),
		MaxAttempts:    int(i.GetMaxAttempts()),
		Target:         i.GetTarget(),
		Permit:         i.GetPermit(),
		KeySlot:        i.GetKeySlot(),
		LastError:      i.GetLastError(),
		EnqueuedAt:     timeOf(i.GetEnqueuedAt()),
		LeaseExpiresAt: timeOf(i.GetLeaseExpiresAt()),
		DeadLetteredAt: timeOf(i.GetDeadLetteredAt()),
		Raw:            i,
	}
}
