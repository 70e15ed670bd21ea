-- Perfect Match (seed 002_97627617e9ce33ee.txt, "PostgreSQL Schema Details"): the tables as
-- the seed defines them, in its order. Additions (the seed leaves them undefined) are marked ADDED.

-- ADDED: uuid_generate_v4() comes from the uuid-ossp extension, which the seed uses but never
-- creates. Where the extension is not installed (the embedded test server ships without it),
-- a function of the same name over the built-in gen_random_uuid() stands in.
DO $$
BEGIN
  CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
EXCEPTION WHEN undefined_file OR feature_not_supported THEN
  CREATE OR REPLACE FUNCTION uuid_generate_v4() RETURNS uuid
  LANGUAGE sql VOLATILE AS 'SELECT gen_random_uuid()';
END
$$;

CREATE TABLE users (
    user_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    email VARCHAR(255) UNIQUE NOT NULL,
    password_hash VARCHAR(255),
    auth_provider VARCHAR(50),
    first_name VARCHAR(100),
    last_name VARCHAR(100),
    birth_date DATE,
    gender VARCHAR(50),
    seeking_gender VARCHAR(50),
    location VARCHAR(255),
    bio TEXT,
    profile_completed BOOLEAN DEFAULT FALSE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    last_active TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    profile_visibility VARCHAR(50) DEFAULT 'matches_only'
);

CREATE INDEX idx_users_email ON users(email);

CREATE INDEX idx_users_location ON users(location);

CREATE INDEX idx_users_gender_seeking ON users(gender, seeking_gender);

CREATE INDEX idx_users_profile_visibility ON users(profile_visibility);

CREATE TABLE profile_media (
    media_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    user_id UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    media_type VARCHAR(50) NOT NULL,
    url VARCHAR(255) NOT NULL,
    display_order INT NOT NULL,
    uploaded_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    
    CONSTRAINT unique_user_display_order UNIQUE (user_id, display_order)
);

CREATE INDEX idx_profile_media_user_id ON profile_media(user_id);

CREATE TABLE user_preferences (
    pref_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    user_id UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    notification_settings JSONB NOT NULL DEFAULT '{}',
    privacy_settings JSONB NOT NULL DEFAULT '{}',
    max_distance INT,
    min_age INT,
    max_age INT,
    
    CONSTRAINT unique_user_preferences UNIQUE (user_id)
);

CREATE INDEX idx_user_preferences_user_id ON user_preferences(user_id);

CREATE TABLE subscription_details (
    subscription_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    user_id UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    plan_type VARCHAR(50) NOT NULL,
    start_date TIMESTAMP WITH TIME ZONE NOT NULL,
    end_date TIMESTAMP WITH TIME ZONE,
    payment_status VARCHAR(50) NOT NULL,
    payment_method VARCHAR(50),
    
    CONSTRAINT unique_user_subscription UNIQUE (user_id)
);

CREATE INDEX idx_subscription_user_id ON subscription_details(user_id);

CREATE INDEX idx_subscription_end_date ON subscription_details(end_date);

CREATE INDEX idx_subscription_plan_type ON subscription_details(plan_type);

CREATE TABLE question_blocks (
    block_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    title VARCHAR(255) NOT NULL,
    description TEXT,
    display_order INT NOT NULL,
    
    CONSTRAINT unique_block_order UNIQUE (display_order)
);

CREATE TABLE questions (
    question_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    block_id UUID NOT NULL REFERENCES question_blocks(block_id) ON DELETE CASCADE,
    text TEXT NOT NULL,
    question_type VARCHAR(50) NOT NULL,
    options JSONB,
    branching_logic JSONB,
    importance_weight INT NOT NULL DEFAULT 1,
    premium_only BOOLEAN DEFAULT FALSE,
    
    CONSTRAINT valid_question_type CHECK (question_type IN ('multiple_choice', 'slider', 'open_ended', 'boolean', 'multiple_select'))
);

CREATE INDEX idx_questions_block_id ON questions(block_id);

CREATE INDEX idx_questions_premium ON questions(premium_only);

CREATE TABLE matches (
    match_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    user_id_1 UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    user_id_2 UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    compatibility_score FLOAT NOT NULL,
    status VARCHAR(50) NOT NULL DEFAULT 'pending',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    user_1_liked BOOLEAN DEFAULT FALSE,
    user_2_liked BOOLEAN DEFAULT FALSE,
    
    CONSTRAINT unique_user_pair UNIQUE (user_id_1, user_id_2),
    CONSTRAINT different_users CHECK (user_id_1 <> user_id_2),
    CONSTRAINT valid_match_status CHECK (status IN ('pending', 'active', 'rejected', 'expired'))
);

CREATE INDEX idx_matches_user_id_1 ON matches(user_id_1);

CREATE INDEX idx_matches_user_id_2 ON matches(user_id_2);

CREATE INDEX idx_matches_score ON matches(compatibility_score DESC);

CREATE INDEX idx_matches_status ON matches(status);

CREATE INDEX idx_matches_created_at ON matches(created_at);

CREATE TABLE compatibility_insights (
    insight_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    match_id UUID NOT NULL REFERENCES matches(match_id) ON DELETE CASCADE,
    highlights JSONB NOT NULL,
    detailed_analysis TEXT,
    is_premium BOOLEAN DEFAULT FALSE,
    
    CONSTRAINT unique_match_insight UNIQUE (match_id)
);

CREATE INDEX idx_insights_match_id ON compatibility_insights(match_id);

CREATE TABLE match_attributes (
    attribute_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    match_id UUID NOT NULL REFERENCES matches(match_id) ON DELETE CASCADE,
    attribute_name VARCHAR(100) NOT NULL,
    score FLOAT NOT NULL,
    description TEXT,
    
    CONSTRAINT unique_match_attribute UNIQUE (match_id, attribute_name)
);

CREATE INDEX idx_match_attributes_match_id ON match_attributes(match_id);

CREATE TABLE conversations (
    conversation_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    match_id UUID NOT NULL REFERENCES matches(match_id) ON DELETE CASCADE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    last_message_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    
    CONSTRAINT unique_match_conversation UNIQUE (match_id)
);

CREATE INDEX idx_conversations_match_id ON conversations(match_id);

CREATE INDEX idx_conversations_last_message ON conversations(last_message_at DESC);

CREATE TABLE messages (
    message_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    conversation_id UUID NOT NULL REFERENCES conversations(conversation_id) ON DELETE CASCADE,
    sender_id UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    message_type VARCHAR(50) NOT NULL DEFAULT 'text',
    content TEXT,
    media_url VARCHAR(255),
    sent_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    read_at TIMESTAMP WITH TIME ZONE,
    
    CONSTRAINT valid_message_type CHECK (message_type IN ('text', 'image', 'reaction'))
);

CREATE INDEX idx_messages_conversation_id ON messages(conversation_id);

CREATE INDEX idx_messages_sender_id ON messages(sender_id);

CREATE INDEX idx_messages_sent_at ON messages(sent_at DESC);

CREATE INDEX idx_messages_read_status ON messages(read_at) WHERE read_at IS NULL;

CREATE TABLE notifications (
    notification_id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    user_id UUID NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    type VARCHAR(50) NOT NULL,
    content JSONB NOT NULL,
    is_read BOOLEAN DEFAULT FALSE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE INDEX idx_notifications_user_id ON notifications(user_id);

CREATE INDEX idx_notifications_type ON notifications(type);

CREATE INDEX idx_notifications_created_at ON notifications(created_at DESC);

CREATE INDEX idx_notifications_read_status ON notifications(is_read);
