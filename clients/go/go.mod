module github.com/backstop-dev/backstop/clients/go

go 1.19
