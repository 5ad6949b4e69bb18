package ec2

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awsec2 "github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/smithy-go"
)

func TestDescribeInstancesWithTheSDK(t *testing.T) {
	s := Start(t)
	launch := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	s.Put("us-east-1", Instance{ID: "i-0123456789abcdef0", State: "running", LaunchTime: launch,
		InstanceProfileARN: "arn:aws:iam::111111111111:instance-profile/web", Tags: map[string]string{"team": "web"}})
	client := func(region string) *awsec2.Client {
		return awsec2.New(awsec2.Options{Region: region, BaseEndpoint: aws.String(s.URL),
			Credentials: credentials.NewStaticCredentialsProvider("AKID", "secret", "")})
	}
	ctx := context.Background()
	out, err := client("us-east-1").DescribeInstances(ctx, &awsec2.DescribeInstancesInput{InstanceIds: []string{"i-0123456789abcdef0"}})
	if err != nil {
		t.Fatal(err)
	}
	in := out.Reservations[0].Instances[0]
	if aws.ToString(in.InstanceId) != "i-0123456789abcdef0" || in.State.Name != "running" || !aws.ToTime(in.LaunchTime).Equal(launch) ||
		aws.ToString(in.IamInstanceProfile.Arn) != "arn:aws:iam::111111111111:instance-profile/web" ||
		len(in.Tags) != 1 || aws.ToString(in.Tags[0].Value) != "web" {
		t.Fatalf("instance %+v", in)
	}
	s.SetState("us-east-1", "i-0123456789abcdef0", "terminated")
	out, _ = client("us-east-1").DescribeInstances(ctx, &awsec2.DescribeInstancesInput{InstanceIds: []string{"i-0123456789abcdef0"}})
	if out.Reservations[0].Instances[0].State.Name != "terminated" {
		t.Fatal("state not changed")
	}
	_, err = client("eu-west-1").DescribeInstances(ctx, &awsec2.DescribeInstancesInput{InstanceIds: []string{"i-0123456789abcdef0"}})
	var ae smithy.APIError
	if !errors.As(err, &ae) || ae.ErrorCode() != "InvalidInstanceID.NotFound" {
		t.Fatalf("other region: %v", err)
	}
	if s.Calls() != 3 {
		t.Fatalf("calls %d", s.Calls())
	}
}
