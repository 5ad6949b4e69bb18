// Package ec2 is a minimal fake of Amazon EC2 for tests of
// imdsproxy-issuer: DescribeInstances with InstanceId.N filters, on the
// EC2 Query protocol (form POST in, XML out) as aws-sdk-go-v2 speaks it.
//
// Instances live per region: the region is read from the SigV4 credential
// scope of the request, as the real regional endpoints imply it. A request
// without a parsable AWS4-HMAC-SHA256 Authorization header for service ec2
// is refused (AuthFailure); signatures are not recomputed. An unknown
// instance id answers InvalidInstanceID.NotFound, as EC2 does.
//
// All methods are safe for concurrent use.
package ec2

import (
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/sigv4"
)

// Instance is one instance the fake knows.
type Instance struct {
	ID                 string
	State              string // running, stopped, terminated, ...
	LaunchTime         time.Time
	InstanceProfileARN string
	AvailabilityZone   string
	Tags               map[string]string
}

// Server is the fake EC2.
type Server struct {
	mu        sync.Mutex
	instances map[string]Instance // region/id
	calls     atomic.Int64
	fail      atomic.Bool

	// URL is set by Start.
	URL string
}

// New returns a fake with no instance.
func New() *Server { return &Server{instances: map[string]Instance{}} }

// Start serves a new fake on loopback, URL set; it is closed when the test
// ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	s := New()
	srv := httptest.NewServer(s)
	s.URL = srv.URL
	tb.Cleanup(srv.Close)
	return s
}

// Put adds or replaces an instance in region.
func (s *Server) Put(region string, in Instance) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.instances[region+"/"+in.ID] = in
}

// SetState changes an instance's state (running → terminated ...).
func (s *Server) SetState(region, id, state string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if in, ok := s.instances[region+"/"+id]; ok {
		in.State = state
		s.instances[region+"/"+id] = in
	}
}

// SetFail makes every later request answer 503 (true) or work again.
func (s *Server) SetFail(v bool) { s.fail.Store(v) }

// Calls returns how many requests arrived.
func (s *Server) Calls() int { return int(s.calls.Load()) }

var stateCodes = map[string]int{"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}

// ServeHTTP answers DescribeInstances.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.calls.Add(1)
	if s.fail.Load() {
		writeError(w, http.StatusServiceUnavailable, "Unavailable", "The service is unavailable. Please try again shortly.")
		return
	}
	a, err := sigv4.Parse(r.Header.Get("Authorization"))
	if err != nil || a.Service != "ec2" {
		writeError(w, http.StatusUnauthorized, "AuthFailure", "AWS was not able to validate the provided access credentials")
		return
	}
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	form, err := url.ParseQuery(string(body))
	if err != nil || r.Method != http.MethodPost {
		writeError(w, http.StatusBadRequest, "InvalidParameterValue", "cannot parse the request")
		return
	}
	if form.Get("Action") != "DescribeInstances" {
		writeError(w, http.StatusBadRequest, "InvalidAction", "The action "+form.Get("Action")+" is not valid for this web service.")
		return
	}
	var ids []string
	for n := 1; ; n++ {
		v := form.Get("InstanceId." + strconv.Itoa(n))
		if v == "" {
			break
		}
		ids = append(ids, v)
	}
	var doc describeXML
	doc.Xmlns = "http://ec2.amazonaws.com/doc/2016-11-15/"
	doc.RequestID = "00000000-0000-4000-8000-000000000000"
	s.mu.Lock()
	defer s.mu.Unlock()
	var missing []string
	for _, id := range ids {
		in, ok := s.instances[a.Region+"/"+id]
		if !ok {
			missing = append(missing, id)
			continue
		}
		it := instanceXML{InstanceID: in.ID, LaunchTime: in.LaunchTime.UTC().Format("2006-01-02T15:04:05.000Z")}
		it.State.Name = in.State
		it.State.Code = stateCodes[in.State]
		it.Placement.AvailabilityZone = in.AvailabilityZone
		if in.InstanceProfileARN != "" {
			it.Profile = &profileXML{Arn: in.InstanceProfileARN, ID: "AIPAEXAMPLE"}
		}
		for k, v := range in.Tags {
			it.Tags = append(it.Tags, tagXML{Key: k, Value: v})
		}
		doc.Reservations = append(doc.Reservations, reservationXML{ID: "r-0" + strings.TrimPrefix(in.ID, "i-"), Instances: []instanceXML{it}})
	}
	if len(missing) > 0 {
		writeError(w, http.StatusBadRequest, "InvalidInstanceID.NotFound",
			fmt.Sprintf("The instance IDs '%s' do not exist", strings.Join(missing, ", ")))
		return
	}
	b, _ := xml.Marshal(doc)
	w.Header().Set("Content-Type", "text/xml;charset=UTF-8")
	_, _ = w.Write(append([]byte(xml.Header), b...))
}

type describeXML struct {
	XMLName      xml.Name         `xml:"DescribeInstancesResponse"`
	Xmlns        string           `xml:"xmlns,attr"`
	RequestID    string           `xml:"requestId"`
	Reservations []reservationXML `xml:"reservationSet>item"`
}

type reservationXML struct {
	ID        string        `xml:"reservationId"`
	Instances []instanceXML `xml:"instancesSet>item"`
}

type instanceXML struct {
	InstanceID string `xml:"instanceId"`
	State      struct {
		Code int    `xml:"code"`
		Name string `xml:"name"`
	} `xml:"instanceState"`
	LaunchTime string `xml:"launchTime"`
	Placement  struct {
		AvailabilityZone string `xml:"availabilityZone"`
	} `xml:"placement"`
	Profile *profileXML `xml:"iamInstanceProfile,omitempty"`
	Tags    []tagXML    `xml:"tagSet>item"`
}

type profileXML struct {
	Arn string `xml:"arn"`
	ID  string `xml:"id"`
}

type tagXML struct {
	Key   string `xml:"key"`
	Value string `xml:"value"`
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	type errXML struct {
		XMLName xml.Name `xml:"Response"`
		Errors  struct {
			Error struct {
				Code    string `xml:"Code"`
				Message string `xml:"Message"`
			} `xml:"Error"`
		} `xml:"Errors"`
		RequestID string `xml:"RequestID"`
	}
	var e errXML
	e.Errors.Error.Code, e.Errors.Error.Message = code, msg
	e.RequestID = "00000000-0000-4000-8000-000000000000"
	b, _ := xml.Marshal(e)
	w.Header().Set("Content-Type", "text/xml;charset=UTF-8")
	w.WriteHeader(status)
	_, _ = w.Write(append([]byte(xml.Header), b...))
}
