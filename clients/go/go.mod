module github.com/backstop-dev/backstop/clients/go

// Go 1.18: generics and strings.Cut. Tested with Go 1.19.8 (Debian 12).
go 1.18

// The minimum versions this module needs: grpc 1.32 is the first with the
// SupportPackageIsVersion7 API the generated stubs use; protobuf 1.25 has
// durationpb/timestamppb's New/AsDuration/AsTime. Tested with grpc 1.33.3 and
// protobuf 1.28.1 (Debian's packages, in GOPATH mode: see README.md). Their
// own dependencies and go.sum are left for `go mod tidy` on a machine with a
// module proxy, rather than listed here unverified.
require (
	google.golang.org/grpc v1.32.0
	google.golang.org/protobuf v1.25.0
)
