package backstop_test

import (
	"context"
	"errors"
	"net"
	"testing"

	backstop "github.com/backstop-dev/backstop/clients/go"
	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// A newer server's answer: a reason and a retry reason this build does not
// know, and fields it has no name for (the announced duplicate / degraded
// flags). Decoding keeps them; the client neither fails nor drops them.
func newerAnswer(t *testing.T) []byte {
	base, err := proto.Marshal(&pb.CanProceedResponse{Allowed: false, Reason: pb.Reason(42), Permit: "opaque.token==", RetryAfter: nil})
	if err != nil {
		t.Fatal(err)
	}
	base = protowire.AppendTag(base, 90, protowire.VarintType)
	base = protowire.AppendVarint(base, 1)
	return base
}

type newerServer struct {
	pb.UnimplementedResilienceServer
	raw []byte
}

func (s *newerServer) CanProceed(context.Context, *pb.CanProceedRequest) (*pb.CanProceedResponse, error) {
	var r pb.CanProceedResponse
	return &r, proto.Unmarshal(s.raw, &r)
}

func (s *newerServer) RecordOutcome(context.Context, *pb.RecordOutcomeRequest) (*pb.RecordOutcomeResponse, error) {
	return &pb.RecordOutcomeResponse{ClassifiedAs: pb.OutcomeClass(99), Retry: &pb.RetryAdvice{Retry: false, Reason: pb.RetryReason(8)}}, nil
}

func TestANewerServersAnswersAreTolerated(t *testing.T) {
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	pb.RegisterResilienceServer(srv, &newerServer{raw: newerAnswer(t)})
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	bs := newClient(t, "bufconn", backstop.WithDialOptions(grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return lis.Dial() })))
	ctx := ctxT(t)
	a, err := bs.CanProceed(ctx, "x/y")
	if err != nil || a.Local || a.Allowed || a.Reason.String() != "Reason(42)" || a.Permit != "opaque.token==" {
		t.Fatalf("%+v %v", a, err)
	}
	if len(a.Raw.ProtoReflect().GetUnknown()) == 0 {
		t.Fatal("the unknown field is kept in Raw")
	}
	_, err = bs.Guard(ctx, "x/y", okFn)
	var other *backstop.OtherRefusalError
	if !errors.As(err, &other) || !errors.Is(err, backstop.ErrRefused) {
		t.Fatalf("an unknown refusal reason is still a refusal: %v", err)
	}
	out, err := bs.RecordOutcome(ctx, backstop.OutcomeReport{Target: "x/y", Permit: a.Permit})
	if err != nil || out.Retry.Retry || out.ClassifiedAs.String() != "OutcomeClass(99)" {
		t.Fatalf("%+v %v", out, err)
	}
}

func TestBearerToken(t *testing.T) {
	srv := startServer(t, fast+"[server]\nadmin_token = \"s3cret-admin-token-0123\"\n")
	with := newClient(t, srv.Addr, backstop.WithToken("s3cret-admin-token-0123"))
	without := newClient(t, srv.Addr)
	ctx := ctxT(t)
	if _, err := with.SetBreakerState(ctx, sonnet, backstop.ModeForceOpen, "test"); err != nil {
		t.Fatal(err)
	}
	_, err := without.SetBreakerState(ctx, sonnet, backstop.ModeAutomatic, "test")
	var cpe *backstop.ControlPlaneError
	if !errors.As(err, &cpe) || cpe.Code != codes.Unauthenticated || cpe.Unavailable() {
		t.Fatalf("want UNAUTHENTICATED, got %v", err)
	}
	// Decisions work with the token too (it is sent on every call).
	if a, err := with.CanProceed(ctx, sonnet); err != nil || a.Allowed || a.Reason != backstop.ReasonForcedOpen {
		t.Fatalf("%+v %v", a, err)
	}
}
