module otelwater/examples

go 1.19
